"""User-facing errors. The CLI prints their message (no traceback) and exits with status 2."""


class StorypipeError(Exception):
    """An error caused by the user's input or environment; the message says what to do."""


class ConfigError(StorypipeError):
    """A config file or override is invalid: the message names the key and the file."""


class DataError(StorypipeError):
    """An input data file or folder is missing or malformed: the message names it."""


def model_load_error(what: str, name_or_path: object, exc: Exception, advice: str) -> StorypipeError:
    """A model that failed ``from_pretrained``: which one, whether a local folder exists, and what to do."""
    from pathlib import Path

    where = (
        "is a local folder, but"
        if Path(str(name_or_path)).exists()
        else "is not a local folder, and as a hub id"
    )
    return StorypipeError(
        f"could not load the {what} {str(name_or_path)!r}: it {where} it failed to load ({exc}).\n{advice}"
    )
