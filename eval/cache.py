"""The per-story eval cache, ``OUT/cache/{story_id}.json``: each row's outputs and the key they were made under.

A row's key is a digest of everything that can change its outputs:

- the row itself (its record in :mod:`eval.rows`: what it is prompted with, what it references);
- its system's identity, from :func:`storypipe.wiring.eval_identities`: the config settings the system
  runs with, each of its model folders' fingerprints (:func:`model_fingerprint`) and the device type;
- the eval seed, for the systems that are given one;
- the story's inputs: its texts, and each image file's path, size and modification time.

A rerun reuses a row's cached outputs only under the same key. A row whose key changed is first dropped
from the record (and the record written), then generated again, so a record never pairs a key with
outputs it did not produce, even when a run is killed halfway. Rows a run does not produce (not in
``eval.rows``, or their model is not configured) stay cached under their own keys, unscored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from eval.rows import Row
from pipeline.config import config_to_dict, model_path_fields
from pipeline.data.vist import VistStory
from pipeline.errors import DataError

CACHE_DIR = "cache"
TABLES = ("text", "images")  # where a record keeps its rows' outputs (each row's ``table``)
KEYS = "keys"  # where a record keeps each row's key, per table
AR_DESCRIPTIONS = "ar_descriptions"  # the told story's descriptions: part of the autoregressive rows
LOCAL_PREFIX = "local:"  # a model fingerprint of a local folder (anything else is a hub id)
# The systems that are called without a seed (both baselines decode greedily): the eval seed is not
# part of their rows' keys, so changing it does not rerun them.
UNSEEDED_MODELS = ("caption_baseline", "text_baseline")

RowKeys = dict[str, dict[str, str]]  # table -> row key -> the digest its outputs are cached under


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def digest(value: Any) -> str:
    """A stable hex digest of plain data (JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()


def file_stamp(path: Path, name: str) -> list:
    """``[name, size, modification time in ns]``: cheap (nothing is read); rewriting the file changes it."""
    stat = path.stat()
    return [name, stat.st_size, stat.st_mtime_ns]


def model_fingerprint(reference: str | None) -> str | None:
    """What identifies a model entry of the config: for a local folder (or file), a digest of every file's
    relative path, size and modification time, so new weights give a new fingerprint without reading
    gigabytes; for a hub id, the id itself (a hub model is not revised under the same cache)."""
    if reference is None:
        return None
    root = Path(reference)
    if not root.exists():
        return reference
    files = sorted(path for path in root.rglob("*") if path.is_file()) if root.is_dir() else [root]
    return LOCAL_PREFIX + digest([file_stamp(path, path.relative_to(root).as_posix()) for path in files])


def section_identity(section: Any, ignore: Iterable[str] = ()) -> dict[str, Any]:
    """A config section's settings, without the fields in ``ignore``, each model entry replaced by its
    :func:`model_fingerprint` (the folder's content counts, not where it is)."""
    values = {name: value for name, value in config_to_dict(section).items() if name not in ignore}
    for name in model_path_fields(section):
        if name in values:
            values[name] = model_fingerprint(values[name])
    return values


def story_inputs(story: VistStory) -> list[list]:
    """What a story feeds every row: each frame's texts and its image file (absolute path, size, time)."""
    inputs = []
    for frame in story.frames:
        image = Path(frame.image_file).resolve()  # as the ground-truth row records it
        inputs.append([frame.story_caption, frame.description, *file_stamp(image, str(image))])
    return inputs


def row_keys(story: VistStory, rows: Sequence[Row], identities: Mapping[str, Any], seed: int) -> RowKeys:
    """The key of each of ``rows`` for ``story``; ``identities`` must name every model the rows need."""
    inputs = story_inputs(story)
    keys: RowKeys = {table: {} for table in TABLES}
    for row in rows:
        if row.model is not None and row.model not in identities:
            raise ValueError(f"row {row.key!r}: no identity for its model {row.model!r}")
        keys[row.table][row.key] = digest({
            "row": [row.table, dataclasses.asdict(row)],
            "system": None if row.model is None else identities[row.model],
            "seed": None if row.model is None or row.model in UNSEEDED_MODELS else seed,
            "story": inputs,
        })  # fmt: skip
    return keys


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


def cache_path(out: Path, story_id: str) -> Path:
    return out / CACHE_DIR / f"{story_id}.json"


def new_record(story_id: str) -> dict[str, Any]:
    """A story's outputs as cached: each row's texts or frame paths under its table and key, and its key."""
    return {"story_id": story_id, "text": {}, "images": {}, KEYS: {table: {} for table in TABLES}}


def read_record(path: Path, story: VistStory) -> dict[str, Any] | None:
    """The cached record of ``story`` at ``path`` (None when there is none); a clear error naming the file
    when it is not one. A record written before rows had keys gets empty keys: every row is regenerated."""
    if not path.is_file():
        return None
    advice = "delete it and rerun to regenerate that story"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not a valid eval cache file ({exc}); {advice}") from exc
    if isinstance(record, dict):
        record.setdefault(KEYS, {table: {} for table in TABLES})
    problem = record_problem(record, story)
    if problem:
        raise DataError(f"{path} is not a valid eval cache file: {problem}; {advice}")
    return record


def record_problem(record: Any, story: VistStory) -> str | None:
    """What is wrong with ``record`` as the cached record of ``story``, or None."""

    def strings(value: Any, count: int | None = None) -> bool:
        return (
            isinstance(value, list)
            and all(isinstance(v, str) for v in value)
            and (count is None or len(value) == count)
        )

    frames = len(story.frames) - 1  # every row has one output for each of frames 1..n-1
    if not isinstance(record, dict):
        return f"it holds a {type(record).__name__}, not an object"
    if record.get("story_id") != story.story_id:
        return f"its story_id is {record.get('story_id')!r}, not {story.story_id!r}"
    keys = record.get(KEYS)
    for table in TABLES:
        outputs = record.get(table)
        if not isinstance(outputs, dict) or not all(strings(v, frames) for v in outputs.values()):
            return f'"{table}" must map each row to a list of {frames} strings'
        if not isinstance(keys, dict) or not isinstance(keys.get(table), dict):
            return f'"{KEYS}" must hold an object for "{table}"'
        if not all(isinstance(v, str) for v in keys[table].values()):
            return f'"{KEYS}"."{table}" must map each row to a string'
    if AR_DESCRIPTIONS in record and not strings(record[AR_DESCRIPTIONS], frames):
        return f'"{AR_DESCRIPTIONS}" must be a list of {frames} strings'
    return None


def drop_stale(record: dict[str, Any], rows: Sequence[Row], keys: RowKeys) -> bool:
    """Remove from ``record`` the outputs of ``rows`` cached under another key than ``keys`` gives them;
    whether there were any."""
    stale = [
        row
        for row in rows
        if row.key in record[row.table] and record[KEYS][row.table].get(row.key) != keys[row.table][row.key]
    ]
    for row in stale:
        del record[row.table][row.key]
        record[KEYS][row.table].pop(row.key, None)
        if row.autoregressive:
            record.pop(AR_DESCRIPTIONS, None)
    return bool(stale)


def current_outputs(record: dict[str, Any], keys: RowKeys) -> dict[str, Any]:
    """``record`` with only the outputs cached under ``keys`` (the rows this run produces, as it would)."""
    current = dict(record)
    for table in TABLES:
        cached = record[KEYS][table]
        current[table] = {
            row: outputs
            for row, outputs in record[table].items()
            if row in keys[table] and cached.get(row) == keys[table][row]
        }
    return current
