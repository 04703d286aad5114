"""Image and file I/O: one image decoder, and atomic writes (a crash never leaves a half-written file).

Every writer goes to a temporary file in the same folder, then ``os.replace`` swaps it in, which is
atomic on POSIX and Windows.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

from pipeline.errors import DataError

# The largest annotation file of VIST, FlintstonesSV and PororoSV is well under this; a JSON file above
# it is not one of theirs, and json.load would need several times its size in memory.
MAX_JSON_BYTES = 2 << 30


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, payload: Any) -> Path:
    """Deterministic JSON (stable key order as given, 2-space indent, UTF-8, trailing newline)."""
    return atomic_write_text(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def atomic_save_image(path: str | Path, image: Image.Image, **save_kwargs: Any) -> Path:
    """Save a PIL image atomically; the format follows ``path``'s extension."""
    image_format = Image.registered_extensions().get(Path(path).suffix.lower())
    return atomic_write(path, lambda handle: image.save(handle, format=image_format, **save_kwargs))


def atomic_write_folder(
    folder: str | Path, write: Callable[[Path], None], keep_existing_files: bool = False
) -> Path:
    """Call ``write(staging)`` on a temporary folder next to ``folder``, then swap it into place.

    With ``keep_existing_files``, files already in ``folder`` that ``write`` did not produce (a run's
    config and log, say) are carried over. A crash leaves the old folder untouched.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        write(staging)
        if folder.is_dir() and keep_existing_files:
            for name in os.listdir(folder):
                if not (staging / name).exists():
                    shutil.move(str(folder / name), staging / name)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def read_json(path: str | Path, advice: str) -> Any:
    """The JSON document in ``path``; a file that is too large, not UTF-8, not JSON, or nested too deeply
    for Python is a one-line ``DataError`` that names it and ends with ``advice`` ("re-download it")."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise DataError(f"{path} is larger than {MAX_JSON_BYTES >> 30} GiB, too large to be a dataset's "
                            f"annotation file; {advice}")  # fmt: skip
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except OSError as exc:
        raise DataError(f"{path} could not be read ({exc.strerror}); {advice}") from exc
    except RecursionError:
        raise DataError(f"{path} is nested too deeply to be a dataset's annotation file; {advice}") from None
    except ValueError as exc:  # not JSON, not UTF-8, or a number too long to convert
        raise DataError(f"{path} is not valid JSON ({exc}); {advice}") from exc


# --------------------------------------------------------------------------------------------
# Reading images
# --------------------------------------------------------------------------------------------


class ImageDecodeError(DataError):
    """An image file exists but cannot be decoded."""


def load_rgb(path: str | Path) -> Image.Image:
    """Fully decode ``path`` and return it as RGB, whatever its mode (L, P, RGBA, CMYK, ...).

    Transparent pixels (RGBA, LA, palette transparency) are composited onto white, so a transparent
    background does not turn into arbitrary colours. GIFs give their first frame.
    """
    try:
        with Image.open(path) as image:
            image.load()  # force a full decode: truncated files fail here, not later
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")
            if image.mode in ("RGBA", "LA", "PA"):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{path} does not decode as an image: {exc}") from exc
