"""The pre-flight check: every model a command needs, whether it is there, and what fetches or makes it.

::

    from storypipe import preflight

    for model in preflight.check(cfg, "generate"):
        print(model.key, model.status, model.size, model.fix)
    preflight.require(cfg, "generate")  # one error naming every missing model

``storypipe check`` prints :func:`check`'s table and writes nothing. ``generate``, ``caption``, ``eval``
and the training commands call :func:`require` before they load anything, so a user sees every missing
model at once. Nothing here loads a model or touches the network: a local folder is found by the file that
marks its kind, a hub id by that file in the Hugging Face cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from eval.config import CLASSIFIER_CONFIG_FILE
from eval.text_metrics import PYTHON_PACKAGE_PREFIX
from pipeline.config import in_cache
from pipeline.errors import StorypipeError
from storypipe.config import StorypipeConfig

# What each command needs; "all" is every model the config names.
PURPOSES = ("all", "generate", "caption", "eval", "finetune-llava", "finetune-storygen", "pretrain-diffusion")
ALL = "all"
CAPTIONING = frozenset({"generate", "caption", "eval"})

FOUND = "found"
BUILT_ON_FIRST_USE = "built on first use"  # a tiny model storypipe builds into its cache
NOT_DOWNLOADED = "not downloaded"  # a hub id that is not in the Hugging Face cache
MISSING = "missing"


@dataclass(frozen=True)
class ModelKind:
    """What a model folder is, the file that marks one, and which of a hub repo's files storypipe reads."""

    name: str
    marker: str
    download_patterns: tuple[str, ...] = ()  # `hf download --include` patterns; () fetches the whole repo


TRANSFORMERS = ModelKind("transformers model", "config.json")
DIFFUSERS = ModelKind(
    "diffusers pipeline",
    "model_index.json",
    # The fp32 safetensors and configs StoryDiffusion.from_pretrained reads; SD repos also hold .ckpt, .bin,
    # fp16 and EMA copies of the same weights.
    (
        "model_index.json",
        "*/*.json",
        "*/*.txt",
        "*/model.safetensors",
        "*/diffusion_pytorch_model.safetensors",
    ),
)
ADAPTER = ModelKind("PEFT adapter", "adapter_config.json")
SENTENCE_MODEL = ModelKind("sentence-transformers model", "config.json")

# Approximate download sizes of well-known hub ids: the weights in one format (`hf download` of a whole
# repo can fetch more, when it holds the weights in several formats).
KNOWN_SIZES = {
    "llava-hf/llava-1.5-7b-hf": "about 14 GB",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "about 4.3 GB",
    "runwayml/stable-diffusion-v1-5": "about 4.3 GB",
    "sentence-transformers/all-roberta-large-v1": "about 1.4 GB",
    "openai/clip-vit-base-patch32": "about 0.6 GB",
    "hustvl/yolos-small": "about 0.1 GB",
    "Salesforce/blip-image-captioning-base": "about 1 GB",
    "mosaicml/mpt-7b-instruct": "about 13 GB",
}
UNKNOWN_SIZE = "unknown"


@dataclass(frozen=True)
class ModelNeed:
    """A model a command needs, as the config names it, before anything is checked."""

    key: str  # the config key, e.g. captioner.base_model
    reference: str  # a hub id, or a local folder (absolute after config loading)
    kind: ModelKind
    make_it: str  # the storypipe command (or setting) that makes a missing local folder
    built_on_first_use: bool = False  # the tiny preset builds it into storypipe's cache


@dataclass(frozen=True)
class ModelStatus:
    """One model's pre-flight result."""

    key: str
    reference: str
    kind: ModelKind
    status: str  # FOUND, BUILT_ON_FIRST_USE, NOT_DOWNLOADED or MISSING
    size: str  # on disk when found, else the expected download size
    fix: str  # the command that fetches it, or the one that makes it
    problem: str = ""  # why it is not usable, for the error

    @property
    def missing(self) -> bool:
        return self.status in (MISSING, NOT_DOWNLOADED)


class MissingModels(StorypipeError):
    """Some models a command needs are missing; ``models`` lists every one of them."""

    def __init__(self, models: list[ModelStatus]) -> None:
        self.models = models
        count = f"{len(models)} model{'s' if len(models) > 1 else ''}"
        lines = [f"{model.key}: {model.problem}" for model in models]
        super().__init__(f"{count} missing (`storypipe check` lists every model):\n  " + "\n  ".join(lines))


# --------------------------------------------------------------------------------------------
# What each command needs
# --------------------------------------------------------------------------------------------


def needed_models(cfg: StorypipeConfig, purpose: str = ALL) -> list[ModelNeed]:
    """The models ``purpose`` (one of :data:`PURPOSES`) loads with this config, in config order."""
    if purpose not in PURPOSES:
        raise StorypipeError(f"unknown pre-flight purpose {purpose!r}; one of {', '.join(PURPOSES)}")
    return [need for purposes, need in _every_model(cfg) if purpose == ALL or purpose in purposes]


def _every_model(cfg: StorypipeConfig) -> Iterator[tuple[frozenset[str], ModelNeed]]:
    """Every model the config names, with the purposes that load it."""
    from llava_ft.config import BASE_MODEL_ADVICE as CAPTIONER_ADVICE
    from llava_ft.config import TASKS, adapter_advice
    from storygen_ft.config import BASE_MODEL_ADVICE as GENERATOR_ADVICE
    from storypipe.wiring import EVAL_MODEL_ADVICE

    captioner, generator, ecfg = cfg.captioner, cfg.generator, cfg.eval
    built = _built_on_first_use(cfg)
    base = captioner.base_model
    yield (
        CAPTIONING | {"finetune-llava"},
        ModelNeed("captioner.base_model", base, TRANSFORMERS, CAPTIONER_ADVICE, base in built),
    )
    for task in TASKS:
        adapter = captioner.adapter_for(task)
        if adapter:
            yield CAPTIONING, ModelNeed(f"captioner.{task}_adapter", adapter, ADAPTER, adapter_advice(task))
    drawing = frozenset({"generate", "eval", "finetune-storygen"})
    yield (
        drawing,
        ModelNeed(
            "generator.base_model",
            generator.base_model,
            DIFFUSERS,
            GENERATOR_ADVICE,
            generator.base_model in built,
        ),
    )
    if generator.tiny is not None and generator.tiny.text_encoder:
        # pretrain-diffusion builds on it, and so does the first use of a tiny model in the cache.
        builds = {"pretrain-diffusion"} | (drawing if generator.base_model in built else set())
        yield frozenset(builds), ModelNeed(
            "generator.tiny.text_encoder", generator.tiny.text_encoder, TRANSFORMERS,
            "`storypipe train-clip` trains a toy CLIP; or set it to null.",
        )  # fmt: skip
    evaluating = frozenset({"eval"})
    kinds: dict[str, ModelKind] = {
        "sentence_model": SENTENCE_MODEL,
        "clip_model": TRANSFORMERS,
        "detector_model": TRANSFORMERS,
        "classifier_model": ModelKind("storypipe frame classifier", CLASSIFIER_CONFIG_FILE),
        "caption_baseline_model": TRANSFORMERS,
        "text_baseline_model": TRANSFORMERS,
        "memory_generator_model": DIFFUSERS,
    }
    for field, kind in kinds.items():
        reference = getattr(ecfg, field)
        if reference:
            yield (
                evaluating,
                ModelNeed(f"eval.{field}", reference, kind, EVAL_MODEL_ADVICE[field], reference in built),
            )


def _built_on_first_use(cfg: StorypipeConfig) -> set[str]:
    """The folders in storypipe's cache that the tiny-model builders fill on first use."""
    candidates = []
    if cfg.captioner.tiny is not None:
        candidates.append(cfg.captioner.base_model)
    if cfg.generator.tiny is not None:
        candidates.append(cfg.generator.base_model)
    if cfg.eval.build_tiny_models:
        candidates += [cfg.eval.clip_model, cfg.eval.detector_model, cfg.eval.text_baseline_model]
    return {folder for folder in candidates if folder and Path(folder).is_absolute() and in_cache(folder)}


# --------------------------------------------------------------------------------------------
# Checking them
# --------------------------------------------------------------------------------------------


def check(cfg: StorypipeConfig, purpose: str = ALL, hub_cache: Path | None = None) -> list[ModelStatus]:
    """Every model ``purpose`` needs, each found or not; reads folders and the hub cache, writes nothing.

    ``hub_cache`` defaults to the Hugging Face cache the environment names (:func:`default_hub_cache`).
    """
    cache = hub_cache if hub_cache is not None else default_hub_cache()
    return [status_of(need, cache) for need in needed_models(cfg, purpose)]


def require(cfg: StorypipeConfig, purpose: str, hub_cache: Path | None = None) -> None:
    """Raise :class:`MissingModels`, naming every one, when a model ``purpose`` needs is missing.

    A hub id that is not in the cache counts as missing only offline (``HF_HUB_OFFLINE``); online,
    ``from_pretrained`` downloads it.
    """
    from huggingface_hub import is_offline_mode

    offline = is_offline_mode()
    missing = [
        model
        for model in check(cfg, purpose, hub_cache)
        if model.status == MISSING or (model.status == NOT_DOWNLOADED and offline)
    ]
    if missing:
        raise MissingModels(missing)


def default_hub_cache() -> Path:
    """The Hugging Face hub cache as the environment names it now (huggingface_hub reads it once, on import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def status_of(need: ModelNeed, hub_cache: Path) -> ModelStatus:
    """Whether one model is there: a local folder with its kind's marker file, or a hub id in the cache."""
    reference, kind = need.reference, need.kind
    if reference.startswith(PYTHON_PACKAGE_PREFIX):
        return _python_package_status(need)
    if not Path(reference).is_absolute():  # a hub id (config loading makes every folder absolute)
        return _hub_status(need, hub_cache)
    folder = Path(reference)
    has_marker = (folder / kind.marker).is_file()
    if need.built_on_first_use and not has_marker:
        return _status(need, BUILT_ON_FIRST_USE, "tiny", "storypipe builds it offline on first use")
    if not folder.exists():
        problem = f"the model folder {folder} does not exist. {need.make_it}"
        return _status(need, MISSING, UNKNOWN_SIZE, need.make_it, problem)
    if not has_marker:
        problem = f"{folder} is not a {kind.name} folder: it has no {kind.marker}. {need.make_it}"
        return _status(need, MISSING, folder_size(folder), need.make_it, problem)
    return _status(need, FOUND, folder_size(folder), need.make_it)


def _hub_status(need: ModelNeed, hub_cache: Path) -> ModelStatus:
    from huggingface_hub import try_to_load_from_cache

    fetch = download_command(need.reference, need.kind)
    cached = try_to_load_from_cache(need.reference, need.kind.marker, cache_dir=hub_cache)
    if isinstance(cached, str):
        return _status(need, FOUND, folder_size(Path(cached).parent), fetch)
    size = KNOWN_SIZES.get(need.reference, UNKNOWN_SIZE)
    problem = (
        f"{need.reference} is not in the Hugging Face cache ({hub_cache}); fetch it ({size}) with `{fetch}`"
    )
    return _status(need, NOT_DOWNLOADED, size, fetch, problem)


def _python_package_status(need: ModelNeed) -> ModelStatus:
    from eval.text_metrics import resolve_model_reference

    try:
        folder = Path(resolve_model_reference(need.reference))
    except StorypipeError as exc:
        return _status(need, MISSING, UNKNOWN_SIZE, need.make_it, str(exc))
    return _status(need, FOUND, folder_size(folder), f"installed as a Python package ({folder})")


def _status(need: ModelNeed, status: str, size: str, fix: str, problem: str = "") -> ModelStatus:
    return ModelStatus(need.key, need.reference, need.kind, status, size, fix, problem)


def download_command(hub_id: str, kind: ModelKind) -> str:
    """The `hf download` command that fetches what storypipe reads of ``hub_id``."""
    patterns = "".join(f" --include '{pattern}'" for pattern in kind.download_patterns)
    return f"hf download {hub_id}{patterns}"


def folder_size(folder: Path) -> str:
    """A folder's size on disk (files behind links included, as in the hub cache), e.g. ``12.3 MB``."""
    size = float(sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()))
    for unit in ("B", "KB", "MB"):
        if size < 1000:
            return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def table(models: list[ModelStatus]) -> list[str]:
    """:func:`check`'s result as lines: one per model, then the command that fetches or makes it."""
    width = max((len(model.key) for model in models), default=0)
    lines = []
    for model in models:
        lines.append(
            f"{model.key:<{width}}  {model.status:<18}  {model.size:<12}  {model.kind.name}: {model.reference}"
        )
        lines.append(f"{'':<{width}}  -> {model.fix}")
    return lines
