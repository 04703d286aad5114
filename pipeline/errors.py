"""User-facing errors. The CLI prints their message (no traceback) and exits with status 2."""


class StorypipeError(Exception):
    """An error caused by the user's input or environment; the message says what to do."""


class InputError(StorypipeError, ValueError):
    """A bad argument to the Python API or the CLI (an empty caption, a frame out of range...); the CLI
    prints the same message."""


class ConfigError(StorypipeError):
    """A config file or override is invalid: the message names the key and the file."""


class InvalidConfigValue(ConfigError):
    """A config value breaks its section's rule. ``field`` is its name within the section; the config
    loader reports it under the key the user wrote (``captioner.pretrain.max_steps``), since one section
    class can serve several keys."""

    def __init__(self, section: str, field: str, message: str) -> None:
        super().__init__(f"{section}.{field} {message}")
        self.field, self.message = field, message


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


def require_model_folder(key: str, reference: object, make_it: str) -> None:
    """A config entry that names a local model folder must name one that exists.

    After config loading, a folder is an absolute path (``./x`` in a preset, ``cache:x``...), while a hub
    id stays relative; so an absolute path that is missing is a clear error, before any model loads,
    that names the key, the folder and what makes it. Nothing is built or downloaded in its place.
    """
    from pathlib import Path

    folder = Path(str(reference))
    if folder.is_absolute() and not folder.exists():
        raise StorypipeError(f"{key}: the model folder {folder} does not exist. {make_it}")
