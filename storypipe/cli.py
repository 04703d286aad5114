"""The ``storypipe`` command line: a table of thin commands over the Python API.

:data:`COMMANDS` lists every command and the function it runs. Each command function takes typed
arguments, calls one function of :mod:`storypipe.api` or :mod:`storypipe.tasks`, and returns the lines to
print; :func:`build_command` gives every command the same scaffolding:

- ``--preset NAME`` / ``--config FILE`` / ``--set section.key=value`` (repeatable) and ``--verbose``;
- options that mirror a config key (``--steps`` for ``generator.num_inference_steps``) reach the config
  as typed values, and win over ``--set``, which wins over the file;
- a user error prints one line, ``error: ...``, and exits with status 2; so does a usage error;
- third-party logging, warnings and download bars stay quiet unless ``--verbose``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml
from rich.console import Console
from rich.text import Text

from pipeline.config import config_to_dict, load_config
from pipeline.errors import InputError, StorypipeError
from pipeline.orchestrator import StoryEvents
from pipeline.progress import ProgressReporter
from storypipe import __version__, preflight, tasks
from storypipe.api import StoryPipeline, story_config_path
from storypipe.config import DEFAULT_PRESET, StorypipeConfig, preset_names, resolve_config
from storypipe.plan import PURPOSES as PLAN_PURPOSES

STORIES_DIR = Path("stories")  # where `generate` writes a story without --out
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
EXISTING_FOLDER = click.Path(exists=True, file_okay=False, path_type=Path)
FOLDER = click.Path(file_okay=False, path_type=Path)


# --------------------------------------------------------------------------------------------
# The scaffolding every command shares
# --------------------------------------------------------------------------------------------


class ConfigOption(click.Option):
    """An option that mirrors a config key: its typed value goes into the config, not to the command."""

    def __init__(self, flag: str, config_key: str, help: str, **kwargs: Any) -> None:
        super().__init__([flag], help=f"{help} [default: the config's {config_key}]", **kwargs)
        self.config_key = config_key


def option(*flags: str, help: str, **kwargs: Any) -> click.Option:
    """A command option; defaults are shown in ``--help``, and a flag shows as a flag."""
    return click.Option(list(flags), help=help, show_default=kwargs.pop("show_default", True), **kwargs)


SHARED_OPTIONS = (
    option(
        "--preset",
        help=f"A preset: {', '.join(preset_names())}. [default: {DEFAULT_PRESET}]",
        show_default=False,
    ),
    option(
        "--config", "config_file", type=EXISTING_FILE, help="Your own YAML config file instead of a preset."
    ),
    option(
        "--set",
        "overrides",
        multiple=True,
        metavar="SECTION.KEY=VALUE",
        help="Override a config key (the value is read as YAML), e.g. --set story.frames=8. Repeatable.",
    ),  # fmt: skip
    option("--verbose", "-v", is_flag=True, help="Also show third-party libraries' logging and warnings."),
)


@dataclass
class Run:
    """What a command function gets besides its own options: the config options, and the console."""

    config_file: Path | None
    preset: str | None
    overrides: tuple[str, ...]
    values: dict[str, Any]
    value_flags: tuple[str, ...] = ()  # the config options given (``--steps``), for error messages
    console: Console = field(default_factory=lambda: Console(soft_wrap=True))

    def config_options_given(self) -> list[str]:
        """The options given that set config values: ``--preset``, ``--config``, ``--set`` and the typed ones."""
        given = [flag for flag, value in (("--preset", self.preset), ("--config", self.config_file)) if value]
        return given + (["--set"] if self.overrides else []) + list(self.value_flags)

    def config(self, story_folder: Path | None = None) -> StorypipeConfig:
        """``--config`` or ``--preset`` when given; else, for a command on a story folder, the folder's own
        ``config.yaml``; else the default preset. ``--set`` and config options apply on top."""
        if story_folder is not None and self.config_file is None and self.preset is None:
            return load_config(StorypipeConfig, story_config_path(story_folder), self.overrides, self.values)
        return resolve_config(self.config_file, self.preset, self.overrides, self.values)

    def progress(self) -> ProgressReporter:
        return ProgressReporter(self.console)

    def note(self, message: str) -> None:
        self.console.print(Text("note: ", style="yellow") + Text(message), highlight=False)

    def story_events(self, progress: ProgressReporter) -> StoryEvents:
        """The story loop's progress: which frame and stage, and the denoising steps."""
        frames, steps = progress.task("frames"), progress.task("denoising")
        return StoryEvents(
            on_stage=lambda index, total, what: frames.update(
                index, total, label=f"frame {index}: {what}" if index < total else "frames"
            ),
            on_step=lambda step, total: steps.update(step, total),
            on_note=self.note,
        )

    def note_zero_shot(self, pipe: StoryPipeline) -> None:
        for task in pipe.zero_shot_tasks:
            self.note(f"no {task} adapter configured (captioner.{task}_adapter): the base model answers "
                      "zero-shot. Train one with `make finetune-llava`.")  # fmt: skip


def build_command(name: str, function: Callable[..., Sequence[str]]) -> click.Command:
    """A click command for ``function(run, **options)``: its options (``function.options``) plus the shared
    ones; it prints the returned lines, the first with the time taken."""
    own = list(getattr(function, "options", ()))

    def callback(config_file, preset, overrides, verbose, **given: Any) -> None:
        quiet_third_party_output(verbose)
        config_options = [opt for opt in own if isinstance(opt, ConfigOption)]
        values = {opt: given.pop(opt.name) for opt in config_options}
        values = {opt: value for opt, value in values.items() if value is not None}
        run = Run(config_file, preset, tuple(overrides), {opt.config_key: value for opt, value in values.items()},
                  value_flags=tuple(opt.opts[0] for opt in values))  # fmt: skip
        started = time.perf_counter()
        lines = list(function(run, **given))
        for number, line in enumerate(lines):
            suffix = f" ({time.perf_counter() - started:.1f}s)" if number == 0 else ""
            run.console.print(line + suffix, highlight=False, markup=False)

    return click.Command(name, callback=callback, params=[*own, *SHARED_OPTIONS], help=function.__doc__)


def options(*params: click.Option) -> Callable[[Callable], Callable]:
    """Attach a command function's own options (read by :func:`build_command`)."""

    def attach(function: Callable) -> Callable:
        function.options = params
        return function

    return attach


def quiet_third_party_output(verbose: bool) -> None:
    """Keep a normal run to storypipe's own progress and results: third-party logging, deprecation and
    future warnings, and download/loading bars are shown only with ``--verbose``. Our own notes about
    the user's input are printed either way."""
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also transformers' "Loading weights" bars
    for name in ("bitsandbytes", "transformers", "diffusers", "accelerate", "peft", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings(
            "ignore", category=category, module=r"(transformers|diffusers|peft|accelerate|torch)"
        )
    warnings.filterwarnings("ignore", category=FutureWarning)
    if "transformers" in sys.modules:  # already imported (e.g. by a test): switch its bars off directly
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()


class StorypipeGroup(click.Group):
    """The command group; every user error, including a usage error, prints as one ``error:`` line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # the table's order, not alphabetical

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra: Any) -> Any:
        standalone = extra.pop("standalone_mode", True)
        prog_name = prog_name or "storypipe"
        errors = Console(stderr=True, soft_wrap=True)
        try:
            result = super().main(args, prog_name, standalone_mode=False, **extra)
            code = result if isinstance(result, int) else 0
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx else "storypipe"
            errors.print(
                Text("error: ", style="bold red") + Text(f"{exc.format_message()} (see `{command} --help`)")
            )
            code = 2
        except (click.ClickException, StorypipeError) as exc:
            message = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
            errors.print(Text("error: ", style="bold red") + Text(message))
            code = 2
        except (click.Abort, KeyboardInterrupt):
            errors.print(Text("error: ", style="bold red") + Text("interrupted"))
            code = 130
        if standalone:
            sys.exit(code)
        return code


@click.group(
    "storypipe",
    cls=StorypipeGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.version_option(__version__, "--version", prog_name="storypipe", message="%(prog)s %(version)s")
def app() -> None:
    """Visual storytelling: from one seed frame, write and draw the rest of the story.

    Every command takes --preset/--config/--set; see the README for the config keys.
    """


# --------------------------------------------------------------------------------------------
# Config and data
# --------------------------------------------------------------------------------------------


def show_config(run: Run) -> list[str]:
    """Print the resolved config (preset + overrides) as YAML."""
    return [yaml.safe_dump(config_to_dict(run.config()), sort_keys=False).rstrip()]


@options(
    option(
        "--for",
        "purpose",
        type=click.Choice(preflight.PURPOSES),
        default=preflight.ALL,
        help="Only the models this command loads.",
    ),
)
def check(run: Run, purpose: str) -> list[str]:
    """List every model the config needs: found or not, its size, and the command that fetches or makes it.

    Writes nothing; exits with status 2 when a model is missing (a hub id not in the Hugging Face cache
    counts as missing).
    """
    models = preflight.check(run.config(), purpose)
    for line in preflight.table(models):
        run.console.print(line, highlight=False, markup=False)
    missing = [model for model in models if model.missing]
    if missing:
        raise preflight.MissingModels(missing)
    return [f"All {len(models)} models are there."]


@options(
    option("--for", "purpose", type=click.Choice(PLAN_PURPOSES), default="generate",
           help="The command whose models to count."),
    option("--gpu-memory", "gpu_memory", default="24GiB", help="The GPU's memory, e.g. 24GiB, 80GB."),
)  # fmt: skip
def plan_memory(run: Run, purpose: str, gpu_memory: str) -> list[str]:
    """Predict a command's peak GPU memory from configs alone (models built on the meta device, activations
    traced on fake tensors): per phase and component its parameters, dtype and GiB; whether the peak fits;
    and, when it does not, settings that lower it. Downloads nothing."""
    from storypipe.plan import plan

    memory_plan = plan(run.config(), purpose, gpu_memory)
    return [f"Peak GPU memory for {purpose} on a {gpu_memory} GPU:", *memory_plan.lines()]


@options(
    option("--language-layers", "language_layers", type=click.IntRange(min=1), default=None, show_default=False,
           help="Decoder layers of the language model to build. [default: 2 on a CPU, all 32 on a GPU]"),
    option("--resolution", type=int, default=512, help="Frame side in pixels."),
    option("--steps", type=click.IntRange(min=1), default=2, help="Denoising steps for the one frame."),
    option("--work-dir", "work_dir", type=FOLDER, default=None, show_default=False,
           help="Keep the built models here (a second run reuses them). [default: a temporary folder]"),
)  # fmt: skip
def dry_run(
    run: Run, language_layers: int | None, resolution: int, steps: int, work_dir: Path | None
) -> list[str]:
    """Build random-weight models with the real configurations (LLaVA-1.5-7B, SD 1.5; nothing is downloaded)
    and run the preset's generate path once: both adapters, a caption, a description, one frame with three
    references. Reports parameters, memory and time per component against `storypipe plan`."""
    import torch

    from storypipe.dry_run import CPU_LANGUAGE_LAYERS, DryRunSettings
    from storypipe.dry_run import dry_run as run_dry_run

    if language_layers is None and not torch.cuda.is_available():
        language_layers = CPU_LANGUAGE_LAYERS
    settings = DryRunSettings(language_layers=language_layers, resolution=resolution, steps=steps)
    report = run_dry_run(settings, run.preset, run.config_file, run.overrides, work_dir)
    return report.lines()


@options(
    option("--out", type=FOLDER, required=True, help="Folder to write the VIST-layout dataset into."),
    ConfigOption("--stories", "toy.stories", type=int, help="Number of stories."),
    ConfigOption("--seed", "toy.seed", type=int, help="Random seed; the same seed gives the same bytes."),
    ConfigOption("--image-size", "toy.image_size", type=int, help="Image side in pixels."),
)
def toy_data(run: Run, out: Path) -> list[str]:
    """Generate ShapeStories, our procedural story world, in VIST's layout (train/val/test)."""
    counts = tasks.toy_data(run.config(), out, run.progress())
    splits = ", ".join(f"{split} {count}" for split, count in counts.items())
    return [f"Wrote {sum(counts.values())} stories ({splits}) to {out}"]


@options(
    option(
        "--vist-dir", type=EXISTING_FOLDER, required=True, help="VIST folder: sis/, dii/, images/{split}/."
    ),
    option("--out", type=FOLDER, required=True, help="Output folder for the captioners' training data."),
    option("--split", default="train", help="Which split to read: train, val or test."),
    option("--limit", type=click.IntRange(min=1), help="Keep the first N usable stories in story_id order."),
    ConfigOption("--image-size", "data.image_size", type=int, help="Side of the square JPEGs."),
)
def prepare_llava(run: Run, vist_dir: Path, out: Path, split: str, limit: int | None) -> list[str]:
    """Build the captioners' LLaVA training data (story_next.json, description.json, caption.json, images/)."""
    report = tasks.prepare_llava(run.config(), vist_dir, out, split, limit, run.progress())
    dropped = sum(report.dropped.values())
    lines = [f"Usable stories: {report.usable_stories}"]
    lines += [f"Samples written to {out / name}: {count}" for name, count in report.samples.items()]
    lines += [f"Images written to {out / 'images'}: {report.images_written}"]
    lines += [f"Dropped stories: {dropped}" + ("" if dropped else " (none)")]
    lines += [f"  {line}" for line in report.drop_lines]
    if report.usable_stories == 0:
        run.note(f"no usable stories in split {split!r} of {vist_dir}; the sample files are empty. "
                 "See the drop reasons above.")  # fmt: skip
    return lines


@options(
    option("--dataset", type=click.Choice(tasks.STORYSV_DATASETS), required=True, help="Which dataset."),
    option("--src", type=EXISTING_FOLDER, required=True, help="The dataset as published (see README)."),
    option("--out", type=FOLDER, required=True, help="Output folder, in VIST layout."),
    option(
        "--referential",
        is_flag=True,
        help="Story captions use pronouns for repeated characters (Make-A-Story's extended text).",
    ),  # fmt: skip
)
def convert_storysv(run: Run, dataset: str, src: Path, out: Path, referential: bool) -> list[str]:
    """Convert FlintstonesSV or PororoSV into the VIST layout, with character and background labels."""
    counts = tasks.convert_storysv(run.config(), dataset, src, out, referential, run.progress())
    splits = ", ".join(f"{split} {count}" for split, count in counts.items())
    return [f"Wrote {sum(counts.values())} stories ({splits}) to {out}"]


# --------------------------------------------------------------------------------------------
# The captioners
# --------------------------------------------------------------------------------------------

RESUME = option("--resume", is_flag=True, help="Continue from the newest checkpoint in --out.")


@options(
    option("--task", type=click.Choice(("story", "description")), required=True, help="Which captioner."),
    option(
        "--data",
        type=EXISTING_FILE,
        required=True,
        help="story_next.json or description.json (prepare-llava).",
    ),
    option("--images", type=EXISTING_FOLDER, required=True, help="The images folder the samples name."),
    option("--out", type=FOLDER, help="Adapter folder. [default: runs/llava-TASK]", show_default=False),
    RESUME,
)
def finetune_llava(
    run: Run, task: str, data: Path, images: Path, out: Path | None, resume: bool
) -> list[str]:
    """LoRA-finetune the LLaVA base for one captioner task; writes a plain PEFT adapter folder."""
    folder = tasks.finetune_llava(
        run.config(), task, data, images, out or Path("runs") / f"llava-{task}", resume
    )
    return [f"Adapter written to {folder} (log: {folder / 'train_log.jsonl'})",
            f"Use it with: --set captioner.{task}_adapter={folder}"]  # fmt: skip


@options(
    option("--data", type=EXISTING_FILE, required=True, help="caption.json from prepare-llava."),
    option("--images", type=EXISTING_FOLDER, required=True, help="The images folder the samples name."),
    option(
        "--out",
        type=FOLDER,
        help="Model folder. [default: the config's captioner.base_model]",
        show_default=False,
    ),
    RESUME,
)
def pretrain_llava(run: Run, data: Path, images: Path, out: Path | None, resume: bool) -> list[str]:
    """Train a tiny LLaVA base from scratch (the toy models; captioner.tiny and captioner.pretrain)."""
    cfg = run.config()
    folder = tasks.pretrain_llava(cfg, data, images, out or Path(cfg.captioner.base_model), resume)
    return [f"Base model written to {folder}"]


@options(
    option("--image", type=EXISTING_FILE, required=True, help="The current frame's image."),
    option("--caption", required=True, help="The current frame's story caption."),
    option(
        "--next-caption", help="The next story caption. [default: the story captioner's]", show_default=False
    ),
    option("--seed", type=int, help="Sampling seed."),
    ConfigOption("--temperature", "captioner.temperature", type=float, help="Sampling temperature."),
)
def caption(run: Run, image: Path, caption: str, next_caption: str | None, seed: int | None) -> list[str]:
    """Print the next story caption and the next frame's description for one image and caption."""
    pipe = StoryPipeline(run.config())
    predicted, description = pipe.caption(image, caption, next_caption, seed=seed)
    run.note_zero_shot(pipe)
    lines = [] if next_caption is not None else [f"Next story caption: {predicted}"]
    return [*lines, f"Description of the next frame: {description}"]


# --------------------------------------------------------------------------------------------
# The frame generator
# --------------------------------------------------------------------------------------------


@options(
    option("--data", type=EXISTING_FOLDER, required=True, help="A VIST-layout folder (e.g. from toy-data)."),
    option("--out", type=FOLDER, required=True, help="Output SD 1.5-layout folder."),
    option("--split", default="train", help="Which split to train on."),
    RESUME,
)
def pretrain_diffusion(run: Run, data: Path, out: Path, split: str, resume: bool) -> list[str]:
    """Train a tiny diffusion base from scratch: a VAE, then a text-to-image UNet (generator.pretrain)."""
    folder = tasks.pretrain_diffusion(run.config(), data, out, split, resume)
    return [f"Base model written to {folder}",
            f"Add context layers with: storypipe finetune-storygen --set generator.base_model={folder}"]  # fmt: skip


@options(
    option(
        "--data",
        type=EXISTING_FOLDER,
        required=True,
        help="A VIST-layout folder (VIST, ShapeStories, converted *SV).",
    ),  # fmt: skip
    option("--out", type=FOLDER, default=Path("runs/storygen"), help="Output model folder."),
    option("--split", default="train", help="Which split to train on."),
    RESUME,
)
def finetune_storygen(run: Run, data: Path, out: Path, split: str, resume: bool) -> list[str]:
    """Finetune the frame generator's added context layers; the output loads with one from_pretrained call."""
    folder = tasks.finetune_storygen(run.config(), data, out, split, resume)
    return [f"Model written to {folder} (log: {folder / 'train_log.jsonl'})",
            f"Use it with: --set generator.base_model={folder}"]  # fmt: skip


@options(
    option("--checkpoint", required=True, help="StoryGen's UNet: a folder or a hub id (e.g. haoningwu/StoryGen)."),
    option("--out", type=FOLDER, required=True, help="Output generator folder (new)."),
    option("--base", default=None, help="SD 1.5 folder or hub id for the VAE, text encoder, tokenizer and "
           "scheduler. [default: the config's generator.base_model]"),
)  # fmt: skip
def import_storygen(run: Run, checkpoint: str, out: Path, base: str | None) -> list[str]:
    """Import StoryGen's released checkpoint as a frame generator that computes exactly as StoryGen does."""
    folder = tasks.import_storygen(run.config(), checkpoint, out, base)
    return [f"StoryGen's weights written to {folder}",
            f"Use it with: --set generator.base_model={folder} --set generator.context=storygen_exact"]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Stories: generate, edit, insert
# --------------------------------------------------------------------------------------------

SAMPLING_OPTIONS = (
    ConfigOption(
        "--temperature", "captioner.temperature", type=float, help="Captioner sampling temperature."
    ),
    ConfigOption("--guidance-scale", "generator.guidance_scale", type=float, help="Text guidance."),
    ConfigOption(
        "--image-guidance-scale",
        "generator.image_guidance_scale",
        type=float,
        help="Reference-frame guidance.",
    ),  # fmt: skip
    ConfigOption("--steps", "generator.num_inference_steps", type=int, help="Denoising steps."),
)


def default_story_folder(caption: str) -> Path:
    """``stories/<the caption's first words>``."""
    slug = "-".join(re.findall(r"[a-z0-9]+", caption.lower()))[:40].strip("-") or "story"
    return STORIES_DIR / slug


@options(
    option("--image", type=click.Path(dir_okay=False, path_type=Path), help="The seed frame's image."),
    option("--caption", help="The seed frame's story caption."),
    option(
        "--description",
        show_default=False,
        help="The seed frame's literal description. [default: the description captioner's]",
    ),  # fmt: skip
    option(
        "--frames",
        type=int,
        show_default=False,
        help="Frames in the story, the seed included (2..20). [default: the config's story.frames]",
    ),
    option(
        "--seed",
        type=int,
        show_default=False,
        help="The story's seed; the same seed gives the same story. [default: the config's story.seed]",
    ),
    option("--out", type=FOLDER, show_default=False, help="Story folder. [default: stories/<caption>]"),
    option(
        "--overwrite",
        is_flag=True,
        help="Replace the story an --out folder holds, once the new one is complete.",
    ),
    option(
        "--resume",
        type=EXISTING_FOLDER,
        help="Continue an interrupted story folder, with the folder's own config.yaml.",
    ),  # fmt: skip
    *SAMPLING_OPTIONS,
)
def generate(
    run: Run,
    image: Path | None,
    caption: str | None,
    description: str | None,
    frames: int | None,
    seed: int | None,
    out: Path | None,
    overwrite: bool,
    resume: Path | None,
) -> list[str]:
    """Write and draw a story from one seed frame: story captions, descriptions and images, frame by frame."""
    if resume is not None:
        story_options = [flag for flag, value in (("--image", image), ("--caption", caption),
                         ("--description", description), ("--frames", frames), ("--seed", seed), ("--out", out),
                         ("--overwrite", overwrite)) if value not in (None, False)]  # fmt: skip
        conflicting = story_options + run.config_options_given()
        if conflicting:
            raise InputError(
                f"--resume continues {resume} with its own config.yaml and settings, so {', '.join(conflicting)} "
                "would change the story; drop " + ("it" if len(conflicting) == 1 else "them")
            )
        pipe = StoryPipeline.from_story(resume)
        with run.progress() as progress:
            story = pipe.resume(resume, events=run.story_events(progress))
        run.note_zero_shot(pipe)
        folder = resume
    else:
        if image is None or caption is None:
            raise InputError("give --image and --caption (or --resume DIR)")
        folder = out or default_story_folder(caption)
        pipe = StoryPipeline(run.config())
        with run.progress() as progress:
            story = pipe.tell(image, caption, description=description, frames=frames, seed=seed,
                              events=run.story_events(progress), save_to=folder, overwrite=overwrite)  # fmt: skip
        run.note_zero_shot(pipe)
    return [f"Story of {len(story.frames)} frames in {folder}. Open {folder / 'storyboard.html'}"]


@options(
    option("--seeds", type=EXISTING_FILE, required=True,
           help='A JSON Lines file, one story a line: {"image": ..., "caption": ..., "description"?: ..., '
                '"frames"?: ..., "seed"?: ..., "id"?: ...}; image paths are relative to its folder.'),
    option("--out", type=FOLDER, required=True, help="Folder for the story folders, one per line: OUT/{id}/."),
    option("--batch-size", "batch_size", type=click.IntRange(min=1), default=8,
           help="Stories told together: frame k of each in one batched call of each model."),
    option("--skip-bad", "skip_bad", is_flag=True,
           help="Tell the good lines when some are bad (each bad line is named either way)."),
    *SAMPLING_OPTIONS,
)  # fmt: skip
def generate_many(run: Run, seeds: Path, out: Path, batch_size: int, skip_bad: bool) -> list[str]:
    """Tell one story per line of a seeds file, B at a time; a rerun skips finished stories and continues
    interrupted ones. Under `accelerate launch --num_processes N` each process tells every N-th story."""
    from storypipe import wiring
    from storypipe.many import StoryOutcome

    cfg = run.config()
    state = wiring.process_state()
    shard = (state.process_index, state.num_processes)
    pipe = StoryPipeline(cfg, device=wiring.process_device(cfg, state))
    prefix = f"[process {shard[0]} of {shard[1]}] " if shard[1] > 1 else ""
    with ProgressReporter(run.console, enabled=state.is_main_process) as progress:
        stories = progress.task("stories")

        def story_done(outcome: StoryOutcome) -> None:
            run.console.print(prefix + outcome.line(), highlight=False, markup=False)
            stories.advance()

        told = pipe.tell_many(seeds, out, batch_size=batch_size, skip_bad=skip_bad, shard=shard,
                              on_start=lambda count: stories.update(0, count), on_story=story_done,
                              events=run.story_events(progress))  # fmt: skip
    run.note_zero_shot(pipe)
    counts = {
        status: sum(o.status == status for o in told.outcomes) for status in ("told", "resumed", "complete")
    }
    skipped = f", {len(told.bad)} bad lines skipped" if told.bad else ""
    return [f"{prefix}{len(told.outcomes)} stories in {out}: {counts['told']} told, {counts['resumed']} resumed, "
            f"{counts['complete']} already complete{skipped}"]  # fmt: skip


@options(
    option("--story", type=EXISTING_FOLDER, required=True, help="A story folder."),
    option("--frame", type=int, required=True, help="Which frame to edit (0 is the seed frame)."),
    option("--caption", required=True, help="The frame's new story caption."),
    option("--strength", type=float, show_default=False,
           help="img2img noise in (0, 1]; 1.0 redraws the frame fully. [default: the config's generator.edit_strength]"),
    option("--propagate", is_flag=True, help="Regenerate the later frames from the edited one."),
    *SAMPLING_OPTIONS,
)  # fmt: skip
def edit(
    run: Run, story: Path, frame: int, caption: str, strength: float | None, propagate: bool
) -> list[str]:
    """Replace a frame's story caption and regenerate its description and image; history/ keeps the old ones.

    The models are the story folder's own (its config.yaml) unless --preset or --config is given.
    """
    pipe = StoryPipeline(run.config(story_folder=story))
    with run.progress() as progress:
        edited = pipe.edit(story, frame, caption, strength=strength, propagate=propagate,
                           events=run.story_events(progress))  # fmt: skip
    return [
        f"Edited frame {frame} of {story} ({len(edited.frames)} frames). Open {story / 'storyboard.html'}"
    ]


@options(
    option("--story", type=EXISTING_FOLDER, required=True, help="A story folder."),
    option(
        "--after",
        type=int,
        required=True,
        help="Insert the new panel after this frame (0 is the seed frame).",
    ),
    option("--caption", required=True, help="The new panel's story caption."),
    *SAMPLING_OPTIONS,
)
def insert(run: Run, story: Path, after: int, caption: str) -> list[str]:
    """Add a panel between two frames, conditioned on the frames before it, and renumber the rest.

    The models are the story folder's own (its config.yaml) unless --preset or --config is given.
    """
    pipe = StoryPipeline(run.config(story_folder=story))
    with run.progress() as progress:
        inserted = pipe.insert(story, after, caption, events=run.story_events(progress))
    return [f"Inserted frame {after + 1} into {story} ({len(inserted.frames)} frames). "
            f"Open {story / 'storyboard.html'}"]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Evaluation and its models
# --------------------------------------------------------------------------------------------


@options(
    option("--data", type=EXISTING_FOLDER, required=True, help="A VIST-layout folder with the ground truth."),
    option(
        "--out",
        type=FOLDER,
        default=Path("runs/eval"),
        help="Results folder (results.json, results.md, plots, cache).",
    ),  # fmt: skip
    ConfigOption("--split", "eval.split", help="Which split."),
    ConfigOption(
        "--max-stories", "eval.max_stories", type=click.IntRange(min=1), help="Evaluate the first N stories."
    ),
)
def evaluate(run: Run, data: Path, out: Path) -> list[str]:
    """Reproduce the source papers' metric tables (text, images, intrinsic) with their baselines."""
    results = tasks.evaluate(run.config(), data, out, run.progress())
    if results is None:  # not the main process of an `accelerate launch` run
        return []
    return [f"Evaluated {results['stories']} stories: {out / 'results.md'}"]


@options(
    option(
        "--data", type=EXISTING_FOLDER, required=True, help="A VIST-layout folder whose frames carry labels."
    ),
    option("--out", type=FOLDER, default=Path("runs/classifier"), help="Classifier folder."),
    RESUME,
)
def train_classifier(run: Run, data: Path, out: Path, resume: bool) -> list[str]:
    """Train the character/background classifier used for accuracy and F1 (Make-A-Story's metrics)."""
    scores = tasks.train_classifier(run.config(), data, out, resume)
    shown = ", ".join(f"{key} {value:.3f}" for key, value in scores.items() if isinstance(value, float))
    return [
        f"Classifier written to {out}; validation: {shown}",
        f"Use it with: --set eval.classifier_model={out}",
    ]


@options(
    option(
        "--data", type=EXISTING_FOLDER, required=True, help="A VIST-layout folder: frames with descriptions."
    ),
    option("--out", type=FOLDER, default=Path("runs/clip"), help="CLIP model folder."),
    RESUME,
)
def train_clip(run: Run, data: Path, out: Path, resume: bool) -> list[str]:
    """Train the tiny CLIP contrastively on (frame, description) pairs, for the CLIP metrics of toy runs."""
    metrics = tasks.train_clip(run.config(), data, out, resume)
    return [
        f"CLIP written to {out}; validation text->image top-1 {metrics['val_text_to_image_top1']:.3f}, "
        f"image->text {metrics['val_image_to_text_top1']:.3f} "
        f"(chance {metrics['val_chance']:.3f}, {metrics['val_pool']} candidates)",
        f"Use it with: --set eval.clip_model={out}",
    ]


@options(
    option("--data", type=EXISTING_FOLDER, required=True, help="A VIST-layout folder: stories of captions."),
    option("--out", type=FOLDER, default=Path("runs/text-baseline"), help="Language model folder."),
    RESUME,
)
def train_text_baseline(run: Run, data: Path, out: Path, resume: bool) -> list[str]:
    """Train the tiny text-only LM baseline on story captions (the toy analogue of the paper's MPT row)."""
    metrics = tasks.train_text_baseline(run.config(), data, out, resume)
    validation = f", validation {metrics['val_loss']:.3f}" if metrics["val_loss"] is not None else ""
    sample = metrics["sample"]
    return [
        f"Language model written to {out}; loss {metrics['first_loss']:.3f} -> {metrics['final_loss']:.3f}"
        + validation,
        f"Sample: {' / '.join(sample['previous'])} -> {sample['next']}",
        f"Use it with: --set eval.text_baseline_model={out}",
    ]


# --------------------------------------------------------------------------------------------
# The table: every command and the function it runs
# --------------------------------------------------------------------------------------------

COMMANDS: dict[str, Callable[..., Sequence[str]]] = {
    "show-config": show_config,
    "check": check,
    "plan": plan_memory,
    "dry-run": dry_run,
    "toy-data": toy_data,
    "prepare-llava": prepare_llava,
    "convert-storysv": convert_storysv,
    "finetune-llava": finetune_llava,
    "pretrain-llava": pretrain_llava,
    "caption": caption,
    "pretrain-diffusion": pretrain_diffusion,
    "finetune-storygen": finetune_storygen,
    "import-storygen": import_storygen,
    "generate": generate,
    "generate-many": generate_many,
    "edit": edit,
    "insert": insert,
    "eval": evaluate,
    "train-classifier": train_classifier,
    "train-clip": train_clip,
    "train-text-baseline": train_text_baseline,
}
for _name, _function in COMMANDS.items():
    app.add_command(build_command(_name, _function))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
