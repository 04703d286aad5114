"""User-facing errors. The CLI prints their message (no traceback) and exits with status 2."""


class StorypipeError(Exception):
    """An error caused by the user's input or environment; the message says what to do."""


class ConfigError(StorypipeError):
    """A config file or override is invalid: the message names the key and the file."""


class DataError(StorypipeError):
    """An input data file or folder is missing or malformed: the message names it."""
