"""Image and file I/O: one image decoder, and atomic writes (a crash never leaves a half-written file).

Every writer goes to a temporary file in the same folder, then ``os.replace`` swaps it in, which is
atomic on POSIX and Windows.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from pipeline.errors import DataError

TEMP_SUFFIX = ".tmp"  # a temporary file or folder of a write in progress: ``.NAME.<random>.tmp``
NEW_FILE_MODE = 0o666  # what open() and mkdir() ask for; the umask takes away the rest (0644 under 022)
NEW_FOLDER_MODE = 0o777


def temp_path_for(path: Path) -> Path:
    """A fresh name next to ``path`` for a write in progress (hidden, and ending in :data:`TEMP_SUFFIX`)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")


def is_temp_path(path: Path) -> bool:
    """Whether ``path`` is a leftover of an atomic write that never finished (see :func:`temp_path_for`)."""
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)


# The largest annotation file of VIST, FlintstonesSV and PororoSV is well under this; a JSON file above
# it is not one of theirs, and json.load would need several times its size in memory.
MAX_JSON_BYTES = 2 << 30


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it into place.

    The file gets the permissions a plain ``open()`` would give it (``mkstemp``'s 0600 would hide a
    storyboard from a web server or another user).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
    staging = temp_path_for(folder)
    staging.mkdir(NEW_FOLDER_MODE)
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


# Gray images wider than 8 bits: Pillow's convert("RGB") clips them at 255 instead of scaling (a 16-bit
# PNG turns white), so they are scaled to 8 bits first. 16-bit RGB(A) PNGs already open as 8-bit RGB(A).
WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
UINT16_MAX = 65535


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
            if image.mode in WIDE_GRAY_MODES:
                image = _gray_to_8_bits(image)
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")
            if image.mode in ("RGBA", "LA", "PA"):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{path} does not decode as an image: {exc}") from exc


def _gray_to_8_bits(image: Image.Image) -> Image.Image:
    """An 8-bit ``L`` image from a 16-bit, 32-bit integer or float gray one.

    Integer modes are read as 16-bit samples (what PNG and TIFF store in them); float images in [0, 1] as
    fractions, any other float image as 16-bit samples too.
    """
    values = np.asarray(image, dtype=np.float64)  # (H, W)
    full_scale = 1.0 if image.mode == "F" and values.size and values.max() <= 1.0 else UINT16_MAX
    scaled = np.clip(np.rint(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)  # (H, W)
    return Image.fromarray(scaled)  # uint8 (H, W) -> mode L
