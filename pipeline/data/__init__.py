"""Dataset readers and converters: VIST, ShapeStories, FlintstonesSV/PororoSV, referential text."""
