"""Honest timings for `bench/`: every candidate is warmed up, then timed in interleaved rounds (the order
rotates each round, so none always runs first or last), and reported as min and median of the rounds.

    timings = interleaved({"plain": plain_step, "story": story_step}, repeats=3)
    print(ratio_line(timings, "story", "plain"))

A figure is a ratio against a reference measured in the same run, never an absolute time alone.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

MIN_REPEATS = 3


@dataclass
class Timing:
    name: str
    seconds: list[float]

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def interleaved(
    candidates: Mapping[str, Callable[[], object]],
    repeats: int = MIN_REPEATS,
    warmup: int = 1,
    self_timed: bool = False,
) -> dict[str, Timing]:
    """Time each candidate ``repeats`` times after ``warmup`` untimed calls, interleaving the candidates.
    With ``self_timed`` each call returns the seconds to record (the part of its work it measured)."""
    if repeats < MIN_REPEATS:
        raise ValueError(f"repeats must be >= {MIN_REPEATS} (min/median of at least three), got {repeats}")
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    timings = {name: Timing(name, []) for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            measured = candidates[name]()
            timings[name].seconds.append(measured if self_timed else time.perf_counter() - started)
    return timings


def ratio_line(timings: Mapping[str, Timing], name: str, reference: str, unit: str = "s") -> str:
    """``name``'s min and median seconds and its ratio to ``reference`` (min/min, median/median)."""
    own, ref = timings[name], timings[reference]
    return (
        f"{name}: min {own.min:.3f} {unit}, median {own.median:.3f} {unit} over {len(own.seconds)} runs; "
        f"{own.min / ref.min:.2f}x / {own.median / ref.median:.2f}x {reference} (min / median)"
    )
