"""storypipe's app layer: the Python API, the CLI and the wiring; the one package that imports the stages."""
