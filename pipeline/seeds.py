"""One way to derive every seed in storypipe: from a base seed and the parts that name one random stream.

``derive_seed(story_seed, "caption", frame, attempt)`` and ``derive_seed(train_seed, "step", step,
process)`` each depend only on their parts, so a resumed run or a regenerated frame draws exactly what an
uninterrupted run would have drawn, and two different purposes never share a stream by accident (as
``seed + frame`` and ``seed + step`` would).
"""

from __future__ import annotations

import hashlib

SEED_BITS = 63  # torch and numpy both accept seeds below 2**63


def derive_seed(*parts: int | str) -> int:
    """A seed that depends only on ``parts`` (ints and strings, in order); any change gives an unrelated one."""
    if not parts:
        raise ValueError("derive_seed needs at least one part")
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, (int, str)):
            raise TypeError(f"seed parts must be ints or strings, got {part!r}")
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - SEED_BITS)
