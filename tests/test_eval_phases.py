"""`storypipe eval` loads its models phase by phase (eval/phases.py): in order, each phase's models freed
before the next phase loads, nothing loaded for a phase whose rows are all cached, and the same cache and
results as with every model loaded at once.

The loaders hand out the fakes of tests/test_eval_rows.py, each holding one stand-in per model group of its
phase that records "load PHASE:GROUP" when it is made and "free PHASE:GROUP" when it is collected, so the
events show what the runner really keeps alive.
"""

from __future__ import annotations

import dataclasses
import json
import weakref

import pytest

from eval.config import EvalConfig
from eval.image_metrics import ClipSimilarity
from eval.phases import EVAL_PHASES, eval_phases
from eval.runner import (
    EvalModels,
    PhasedModels,
    evaluate,
    evaluate_in_phases,
    generate_story_outputs,
    select_stories,
    story_keys,
)
from eval.scoring import Measures
from storypipe.config import resolve_config
from storypipe.wiring import eval_phases as config_eval_phases
from tests.test_eval_rows import STORIES, fake_identities, fake_models
from toy.builders import build_tiny_clip

ALL_SYSTEMS = frozenset(field.name for field in dataclasses.fields(EvalModels))


class _Weights:
    """Stands for one model group's weights on the device: records its load, and its free when collected."""

    def __init__(self, label: str, events: list[str]) -> None:
        events.append(f"load {label}")
        weakref.finalize(self, events.append, f"free {label}")


def _exact(predictions, references):  # sentence similarity 1 for an exact match, else 0
    return [float(p == r) for p, r in zip(predictions, references, strict=True)]


def recording_models(stories, clip, events: list[str], steps: int = 20, fail: str | None = None):
    """Every system, each phase's loaded afresh from ``fake_models`` with its groups' stand-ins attached;
    the phase named ``fail`` crashes as it loads."""

    def loader(phase):
        def load() -> EvalModels:
            if phase.name == fail:
                raise RuntimeError(f"simulated crash loading {phase.name}")
            models = fake_models(stories, steps).only(phase.systems)
            for name in models.systems:
                getattr(models, name).weights = [_Weights(f"{phase.name}:{g}", events) for g in phase.models]
            return models

        return load

    def load_measures() -> Measures:
        measures = Measures(sentence=_exact, clip=clip)
        measures.weights = [_Weights("scoring:measures", events)]
        return measures

    generating = [phase for phase in EVAL_PHASES if not phase.scoring]
    return PhasedModels(ALL_SYSTEMS, {phase.name: loader(phase) for phase in generating}, load_measures)


def loads(events: list[str]) -> list[str]:
    return [event.removeprefix("load ") for event in events if event.startswith("load ")]


def assert_one_phase_resident_at_a_time(events: list[str]) -> None:
    """At every load, only the loading phase's models are resident; at the end, none."""
    resident: set[str] = set()
    for event in events:
        action, label = event.split(" ", 1)
        if action == "load":
            phase = label.split(":")[0]
            assert all(other.split(":")[0] == phase for other in resident), (event, resident)
            resident.add(label)
        else:
            resident.remove(label)
    assert not resident, resident


@pytest.fixture(scope="module")
def stories(toy_stories):
    return select_stories(toy_stories, EvalConfig(split="train", max_stories=STORIES), story_length=5)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return ClipSimilarity.load(build_tiny_clip(tmp_path_factory.mktemp("models") / "clip"))


@pytest.fixture(scope="module")
def phased(stories, clip, toy_stories, tmp_path_factory):
    """One phased evaluation with every system: (results, events, out)."""
    out, events = tmp_path_factory.mktemp("eval-phases") / "run", []
    cfg = EvalConfig(split="train", max_stories=STORIES)
    models = recording_models(stories, clip, events)
    results = evaluate_in_phases(stories, toy_stories, out, cfg, models, identities=fake_identities())
    return results, events, out


EVERY_LOAD = [
    "captioners:captioners",
    "told_stories:captioners",
    "told_stories:generator",
    "generator:generator",
    "memory_generator:memory_generator",
    "caption_baseline:caption_baseline",
    "text_baseline:text_baseline",
    "scoring:measures",
]


def test_phases_load_in_order_and_each_is_freed_before_the_next_loads(phased):
    _, events, _ = phased
    assert loads(events) == EVERY_LOAD
    assert_one_phase_resident_at_a_time(events)


def test_the_results_and_the_cache_equal_those_of_every_model_loaded_at_once(
    phased, stories, clip, toy_stories, tmp_path
):
    results, _, out = phased
    cfg = EvalConfig(split="train", max_stories=STORIES)
    together = evaluate(
        stories, toy_stories, tmp_path / "together", cfg, fake_models(stories), Measures(_exact, clip),
        identities=fake_identities(),
    )  # fmt: skip
    assert results == together
    keys = story_keys(stories, ALL_SYSTEMS, cfg, fake_identities())
    for story, images in stories:  # and each record as one story's outputs made with every model at once
        cached = json.loads((out / "cache" / f"{story.story_id}.json").read_text())
        assert cached == json.loads((tmp_path / "together" / "cache" / f"{story.story_id}.json").read_text())
        at_once = generate_story_outputs(
            story, images, fake_models(stories), cfg, tmp_path / "at-once", keys=keys[story.story_id]
        )
        assert cached == json.loads(json.dumps(at_once))


def test_a_rerun_loads_only_the_phases_whose_rows_are_not_cached(
    phased, stories, clip, toy_stories, tmp_path
):
    results, _, out = phased
    cfg = EvalConfig(split="train", max_stories=STORIES)
    events: list[str] = []
    again = evaluate_in_phases(stories, toy_stories, out, cfg, recording_models(stories, clip, events),
                               identities=fake_identities())  # fmt: skip
    assert loads(events) == ["scoring:measures"] and again == results  # every row cached: only scoring
    events.clear()  # other generator settings: only the generator's rows are stale
    evaluate_in_phases(stories, toy_stories, out, cfg, recording_models(stories, clip, events, steps=3),
                       identities=fake_identities(steps=3))  # fmt: skip
    assert loads(events) == ["generator:generator", "scoring:measures"]
    assert_one_phase_resident_at_a_time(events)


def test_a_run_that_crashes_in_a_phase_resumes_from_that_phase(stories, clip, toy_stories, tmp_path, phased):
    cfg, events = EvalConfig(split="train", max_stories=STORIES), []
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate_in_phases(stories, toy_stories, tmp_path, cfg,
                           recording_models(stories, clip, events, fail="caption_baseline"),
                           identities=fake_identities())  # fmt: skip
    assert loads(events) == EVERY_LOAD[:5]
    assert_one_phase_resident_at_a_time(events)  # the finished phases were freed; nothing left loaded
    events.clear()
    results = evaluate_in_phases(stories, toy_stories, tmp_path, cfg, recording_models(stories, clip, events),
                                 identities=fake_identities())  # fmt: skip
    assert loads(events) == EVERY_LOAD[5:]
    assert results == phased[0]


def test_sharded_processes_each_load_for_their_share_and_only_the_main_one_scores(
    stories, clip, toy_stories, tmp_path, phased
):
    cfg = EvalConfig(split="train", max_stories=STORIES)
    shares = {}
    for index in (1, 0):  # the main process last: it merges what both made
        events: list[str] = []
        models = recording_models(stories, clip, events)
        result = evaluate_in_phases(stories, toy_stories, tmp_path, cfg, models, index, 2,
                                    identities=fake_identities())  # fmt: skip
        shares[index] = (result, loads(events))
    assert shares[1] == (None, EVERY_LOAD[:-1])  # each process made its own story; only process 0 scores
    assert shares[0] == (phased[0], EVERY_LOAD)


def test_the_phase_list_follows_the_configured_systems_and_rows():
    names = [phase.name for phase in EVAL_PHASES]
    assert names[-1] == "scoring" and eval_phases(ALL_SYSTEMS) == EVAL_PHASES
    assert {system for phase in EVAL_PHASES for system in phase.systems} == ALL_SYSTEMS
    assert eval_phases(ALL_SYSTEMS, ["sd_no_context", "gt"]) == (EVAL_PHASES[2], EVAL_PHASES[-1])
    # The planner's view: the vist preset's phases, each with the model groups it holds at once.
    vist = resolve_config(preset="vist")
    assert [(phase.name, phase.models) for phase in config_eval_phases(vist)] == [
        ("captioners", ("captioners",)),
        ("told_stories", ("captioners", "generator")),
        ("generator", ("generator",)),
        ("caption_baseline", ("caption_baseline",)),
        ("text_baseline", ("text_baseline",)),
        ("scoring", ("measures",)),
    ]  # no memory generator configured: no memory phase
    memory = resolve_config(preset="vist", overrides=["eval.memory_generator_model=some/hub-id",
                                                      "eval.text_baseline_model=null"])  # fmt: skip
    assert [phase.name for phase in config_eval_phases(memory)] == [
        "captioners", "told_stories", "generator", "memory_generator", "caption_baseline", "scoring",
    ]  # fmt: skip
