"""The phases of `storypipe eval`: which models each one holds on the device, one phase at a time.

The systems under test and the measuring models of the real preset do not fit one 24 GB GPU together
(a 7B LLaVA, SD 1.5 twice, a 7B text LM, BLIP, RoBERTa, CLIP, YOLOS). So the runner (:mod:`eval.runner`)
goes through :data:`EVAL_PHASES` in order: each phase loads its models, produces its rows for every story
of this process's share that lacks them (the last one scores instead), and releases what it loaded
(:func:`release_memory`) before the next phase loads anything. A phase whose rows are all cached loads
nothing. The memory planner reports eval's peak as the largest of :func:`eval_phases`.
"""

from __future__ import annotations

import gc
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from eval.rows import IMAGE_ROWS, TEXT_ROWS, Model, select_rows

# What a phase holds on the device: the captioners (one LLaVA base with both adapters), the frame generator
# (StoryGen-style SD), the memory-attention generator (eval.memory_generator_model), each baseline, and the
# measuring models (sentence embeddings, CLIP, and the optional detector and classifier).
ModelGroup = Literal[
    "captioners", "generator", "memory_generator", "caption_baseline", "text_baseline", "measures"
]


@dataclass(frozen=True)
class EvalPhase:
    """One phase: the model groups it holds at once, and the systems under test whose rows it produces
    (fields of :class:`eval.runner.EvalModels`); the scoring phase produces none."""

    name: str
    models: tuple[ModelGroup, ...]
    systems: tuple[Model, ...] = ()

    @property
    def scoring(self) -> bool:
        return not self.systems


# In the order they run. The told stories need both the captioners and the generator, so that phase holds
# both; every other phase holds one group.
EVAL_PHASES: tuple[EvalPhase, ...] = (
    EvalPhase("captioners", models=("captioners",), systems=("captioners",)),
    EvalPhase("told_stories", models=("captioners", "generator"), systems=("tell_story",)),
    EvalPhase("generator", models=("generator",), systems=("illustrator",)),
    EvalPhase("memory_generator", models=("memory_generator",), systems=("memory_illustrator",)),
    EvalPhase("caption_baseline", models=("caption_baseline",), systems=("caption_baseline",)),
    EvalPhase("text_baseline", models=("text_baseline",), systems=("text_baseline",)),
    EvalPhase("scoring", models=("measures",)),
)


def eval_phases(systems: Collection[str], rows: Sequence[str] | None = None) -> tuple[EvalPhase, ...]:
    """The phases a run goes through whose configured systems are ``systems`` and whose ``eval.rows`` is
    ``rows``: each generating phase with a selected row of a configured system, then scoring. Which of
    them load anything depends on the cache; these are the most a run loads."""
    produced = {row.model for row in select_rows((*TEXT_ROWS, *IMAGE_ROWS), rows) if row.model in systems}
    return tuple(phase for phase in EVAL_PHASES if phase.scoring or produced & set(phase.systems))


def release_memory() -> None:
    """Free what the models just dropped held: collect garbage, then return CUDA's cached blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
