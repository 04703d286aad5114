"""Benchmark: grouping a VIST-scale split costs little more than parsing its JSON.

Writes a synthetic split the size of VIST's train set (40k stories, 200k SIS and 200k DII annotations,
image files as empty placeholders: grouping never decodes them) and reports the time of
``load_vist_split`` as a ratio against a bare ``json.load`` of the same two files, measured in this process
(bench/timing.py: warmed up, interleaved, min / median of 3).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from timing import interleaved, ratio_line

from pipeline.data.vist import (
    dii_annotation,
    dii_path,
    images_dir,
    load_vist_split,
    sis_annotation,
    sis_path,
    vist_document,
)

STORIES = 40_000
STORY_LENGTH = 5


def write_split(root: Path) -> None:
    sis, dii = [], []
    folder = images_dir(root, "train")
    folder.mkdir(parents=True)
    for story in range(STORIES):
        for order in range(STORY_LENGTH):
            photo = str(story * STORY_LENGTH + order)
            sis.append(
                sis_annotation(str(story), str(story), photo, order, f"sentence {order} of story {story}.")
            )
            dii.append(dii_annotation(str(story), photo, order, f"a photo numbered {photo}."))
            (folder / f"{photo}.jpg").touch()
    for path, records, tier in ((sis_path(root, "train"), sis, "sis"), (dii_path(root, "train"), dii, "dii")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(vist_document(records, [], [], tier)))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_split(root)

        def parse() -> None:
            for path in (sis_path(root, "train"), dii_path(root, "train")):
                json.loads(path.read_text())

        def load() -> None:
            assert len(load_vist_split(root, "train").stories) == STORIES

        timings = interleaved({"json.load": parse, "load_vist_split": load})
    print(f"VIST load, {STORIES} stories (the SIS and DII files of VIST train's size):")
    print("  " + ratio_line(timings, "load_vist_split", "json.load"))
    print("  " + ratio_line(timings, "json.load", "json.load"))


if __name__ == "__main__":
    main()
