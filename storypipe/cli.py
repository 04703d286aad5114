"""The ``storypipe`` command line.

Every command takes ``--config FILE`` or ``--preset NAME`` (a file in ``configs/``) and any number of
``--set section.key=value`` overrides. Command options that mirror a config key (``--image-size``...)
are applied last, and the resolved config is written into every output folder.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from PIL import Image
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from pipeline.config import config_to_dict, save_resolved_config
from pipeline.errors import StorypipeError
from storypipe import wiring
from storypipe.config import StorypipeConfig, resolve_config

app = typer.Typer(
    name="storypipe",
    help="Visual storytelling: from one seed frame, write and draw the rest of the story.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])

# Options every command shares.
ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="A YAML config file (see configs/).", dir_okay=False)
]
PresetOption = Annotated[
    str | None, typer.Option("--preset", help="A preset name: a file configs/NAME.yaml (default: vist).")
]
ResumeOption = Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in --out.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, e.g. --set data.image_size=256. Repeatable."),
]


def user_errors(command: F) -> F:
    """Print a ``StorypipeError`` as one clear line (no traceback) and exit with status 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except StorypipeError as exc:
            err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


def _config(
    config: Path | None, preset: str | None, sets: list[str] | None, **options: Any
) -> StorypipeConfig:
    """Resolve the config; ``options`` maps ``section.key`` to a command-line value (None = not given)."""
    option_overrides = [f"{key}={json.dumps(value)}" for key, value in options.items() if value is not None]
    return resolve_config(config, preset, [*(sets or []), *option_overrides])


def _progress() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


@app.command("show-config")
@user_errors
def show_config(config: ConfigOption = None, preset: PresetOption = None, set_: SetOption = None) -> None:
    """Print the resolved config (preset + overrides) as YAML."""
    cfg = _config(config, preset, set_)
    console.print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="", highlight=False, markup=False)


@app.command("toy-data")
@user_errors
def toy_data(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the VIST-layout dataset into.")],
    stories: Annotated[int | None, typer.Option(help="Number of stories (config toy.stories).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed; the same seed gives the same bytes.")] = None,
    image_size: Annotated[
        int | None, typer.Option(help="Image side in pixels (config toy.image_size).")
    ] = None,
    config: ConfigOption = None,
    preset: PresetOption = None,
    set_: SetOption = None,
) -> None:
    """Generate ShapeStories, our procedural story world, in VIST's layout (train/val/test)."""
    from pipeline.data.shapestories import generate_shapestories

    cfg = _config(
        config, preset, set_, **{"toy.stories": stories, "toy.seed": seed, "toy.image_size": image_size}
    )
    started = time.perf_counter()
    with _progress() as progress:
        task = progress.add_task("ShapeStories", total=cfg.toy.stories)
        counts = generate_shapestories(out, cfg.toy, progress=lambda n: progress.advance(task, n))
    save_resolved_config(cfg, out)
    split_text = ", ".join(f"{split} {count}" for split, count in counts.items())
    console.print(
        f"Wrote {sum(counts.values())} stories ({split_text}) to {out} in {time.perf_counter() - started:.1f}s"
    )


@app.command("prepare-llava")
@user_errors
def prepare_llava_command(
    vist_dir: Annotated[Path, typer.Option("--vist-dir", help="VIST folder: sis/, dii/, images/{split}/.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for the captioners' training data.")],
    split: Annotated[str, typer.Option(help="Which split to read: train, val or test.")] = "train",
    limit: Annotated[
        int | None, typer.Option(help="Keep the first N usable stories in story_id order.")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="Side of the square JPEGs (config data.image_size).")
    ] = None,
    config: ConfigOption = None,
    preset: PresetOption = None,
    set_: SetOption = None,
) -> None:
    """Build the captioners' LLaVA training data (story_next.json, description.json, images/)."""
    from llava_ft.prepare import prepare_llava

    if limit is not None and limit < 1:
        raise typer.BadParameter("--limit must be at least 1", param_hint="--limit")
    cfg = _config(config, preset, set_, **{"data.image_size": image_size})
    with _progress() as progress:
        task = progress.add_task("Stories", total=None)
        report = prepare_llava(
            vist_dir,
            split,
            out,
            cfg.data,
            limit=limit,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    save_resolved_config(cfg, out)
    console.print(f"Usable stories: {report.usable_stories}")
    for name, count in report.samples.items():
        console.print(f"Samples written to {out / name}: {count}")
    console.print(f"Images written to {out / 'images'}: {report.images_written}")
    dropped = sum(report.dropped.values())
    console.print(f"Dropped stories: {dropped}" + ("" if dropped else " (none)"))
    for line in report.drop_lines:
        console.print(f"  {line}", highlight=False)
    if report.usable_stories == 0:
        err_console.print(
            f"[bold yellow]warning:[/bold yellow] no usable stories in split {split!r} of {vist_dir}; "
            "the sample files are empty. See the drop reasons above.",
            highlight=False,
        )


@app.command("finetune-llava")
@user_errors
def finetune_llava_command(
    task: Annotated[str, typer.Option(help="Which captioner: story or description.")],
    data: Annotated[
        Path, typer.Option("--data", help="story_next.json or description.json from prepare-llava.")
    ],
    images: Annotated[Path, typer.Option("--images", help="The images folder the samples name.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Adapter folder (default: runs/llava-TASK).")
    ] = None,
    resume: ResumeOption = False,
    config: ConfigOption = None,
    preset: PresetOption = None,
    set_: SetOption = None,
) -> None:
    """LoRA-finetune the LLaVA base for one captioner task; writes a plain PEFT adapter folder."""
    cfg = _config(config, preset, set_)
    out = out or Path("runs") / f"llava-{task}"
    started = time.perf_counter()
    folder = wiring.finetune_llava(cfg, task, data, images, out, resume=resume)
    console.print(
        f"Adapter written to {folder} in {time.perf_counter() - started:.1f}s (log: {folder / 'train_log.jsonl'})"
    )
    console.print(f"Use it with: --set captioner.{task}_adapter={folder}")


@app.command("pretrain-llava")
@user_errors
def pretrain_llava_command(
    data: Annotated[Path, typer.Option("--data", help="caption.json from prepare-llava.")],
    images: Annotated[Path, typer.Option("--images", help="The images folder the samples name.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Model folder (default: captioner.base_model).")
    ] = None,
    resume: ResumeOption = False,
    config: ConfigOption = None,
    preset: PresetOption = None,
    set_: SetOption = None,
) -> None:
    """Train a tiny LLaVA base from scratch (the toy models; captioner.tiny and captioner.pretrain)."""
    cfg = _config(config, preset, set_)
    out = out or Path(cfg.captioner.base_model)
    started = time.perf_counter()
    folder = wiring.pretrain_llava(cfg, data, images, out, resume=resume)
    console.print(f"Base model written to {folder} in {time.perf_counter() - started:.1f}s")


@app.command("caption")
@user_errors
def caption_command(
    image: Annotated[Path, typer.Option("--image", help="The current frame's image.")],
    caption: Annotated[str, typer.Option("--caption", help="The current frame's story caption.")],
    next_caption: Annotated[
        str | None,
        typer.Option("--next-caption", help="The next story caption (default: the story captioner's)."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Sampling temperature (config captioner.temperature).")
    ] = None,
    config: ConfigOption = None,
    preset: PresetOption = None,
    set_: SetOption = None,
) -> None:
    """Print the next story caption and the next frame's description for one image and caption."""
    from pipeline.io import load_rgb

    if not caption.strip():
        raise typer.BadParameter("the caption is empty", param_hint="--caption")
    if not image.is_file():
        raise typer.BadParameter(f"{image} does not exist", param_hint="--image")
    picture = load_rgb(image)
    cfg = _config(config, preset, set_, **{"captioner.temperature": temperature})
    captioners = wiring.load_captioners(cfg)
    for task in captioners.zero_shot_tasks:
        console.print(f"[yellow]note:[/yellow] no {task} adapter configured (captioner.{task}_adapter): "
                      f"the base model answers zero-shot. Train one with `make finetune-llava`.")  # fmt: skip
    if next_caption is None:
        next_caption = captioners.next_story_caption(picture, caption, seed=seed)
        console.print(f"Next story caption: {next_caption}", highlight=False)
    description = captioners.describe(picture, caption, next_caption, seed=seed)
    console.print(f"Description of the next frame: {description}", highlight=False)


@app.command("pretrain-diffusion")
@user_errors
def pretrain_diffusion_command(
    data: Annotated[Path, typer.Option("--data", help="A VIST-layout folder (e.g. from toy-data).")],
    out: Annotated[Path, typer.Option("--out", help="Output SD 1.5-layout folder.")],
    split: Annotated[str, typer.Option(help="Which split to train on.")] = "train",
    resume: ResumeOption = False,
    config: ConfigOption = None,
    preset: PresetOption = None,
    set_: SetOption = None,
) -> None:
    """Train a tiny diffusion base from scratch: a VAE, then a text-to-image UNet (generator.pretrain)."""
    cfg = _config(config, preset, set_)
    started = time.perf_counter()
    folder = wiring.pretrain_diffusion(cfg, data, out, split=split, resume=resume)
    console.print(f"Base model written to {folder} in {time.perf_counter() - started:.1f}s")
    console.print(f"Add context layers with: storypipe finetune-storygen --set generator.base_model={folder}")


@app.command("finetune-storygen")
@user_errors
def finetune_storygen_command(
    data: Annotated[
        Path, typer.Option("--data", help="A VIST-layout folder (VIST, ShapeStories, converted *SV).")
    ],
    split: Annotated[str, typer.Option(help="Which split to train on.")] = "train",
    out: Annotated[Path, typer.Option("--out", help="Output model folder.")] = Path("runs/storygen"),
    resume: ResumeOption = False,
    config: ConfigOption = None,
    preset: PresetOption = None,
    set_: SetOption = None,
) -> None:
    """Finetune the frame generator's added context layers; the output loads with one from_pretrained call."""
    cfg = _config(config, preset, set_)
    started = time.perf_counter()
    folder = wiring.finetune_storygen(cfg, data, out, split=split, resume=resume)
    console.print(
        f"Model written to {folder} in {time.perf_counter() - started:.1f}s (log: {folder / 'train_log.jsonl'})"
    )
    console.print(f"Use it with: --set generator.base_model={folder}")


@app.command("convert-storysv")
@user_errors
def convert_storysv_command(
    dataset: Annotated[str, typer.Option(help="flintstones or pororo.")],
    src: Annotated[Path, typer.Option("--src", help="The dataset as published (see README).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder, in VIST layout.")],
    referential: Annotated[
        bool,
        typer.Option(
            "--referential",
            help="Story captions use pronouns for repeated characters (Make-A-Story's extended text).",
        ),
    ] = False,
    config: ConfigOption = None,
    preset: PresetOption = None,
    set_: SetOption = None,
) -> None:
    """Convert FlintstonesSV or PororoSV into the VIST layout, with character and background labels."""
    from pipeline.data.storysv import convert_storysv

    if dataset not in ("flintstones", "pororo"):
        raise typer.BadParameter("must be flintstones or pororo", param_hint="--dataset")
    cfg = _config(config, preset, set_)
    with _progress() as progress:
        task = progress.add_task(dataset, total=None)
        counts = convert_storysv(
            dataset, src, out, referential=referential, progress=lambda n: progress.advance(task, n)
        )
    save_resolved_config(cfg, out)
    console.print(
        f"Wrote {sum(counts.values())} stories ("
        + ", ".join(f"{k} {v}" for k, v in counts.items())
        + f") to {out}"
    )


# --------------------------------------------------------------------------------------------
# Stories: generate, edit, insert
# --------------------------------------------------------------------------------------------

StepsOption = Annotated[
    int | None, typer.Option("--steps", help="Denoising steps (generator.num_inference_steps).")
]
GuidanceOption = Annotated[
    float | None, typer.Option("--guidance-scale", help="Text guidance (generator.guidance_scale).")
]
ImageGuidanceOption = Annotated[
    float | None,
    typer.Option("--image-guidance-scale", help="Reference-frame guidance (generator.image_guidance_scale)."),
]
TemperatureOption = Annotated[
    float | None, typer.Option("--temperature", help="Captioner sampling temperature.")
]


def _sampling_overrides(temperature, guidance_scale, image_guidance_scale, steps) -> dict[str, Any]:
    return {
        "captioner.temperature": temperature,
        "generator.guidance_scale": guidance_scale,
        "generator.image_guidance_scale": image_guidance_scale,
        "generator.num_inference_steps": steps,
    }


def _story_config(folder: Path, sets: list[str] | None, **options: Any) -> StorypipeConfig:
    """The config a story folder was made with, plus this command's overrides."""
    from pipeline.config import RESOLVED_CONFIG_NAME, load_config

    path = folder / RESOLVED_CONFIG_NAME
    if not path.is_file():
        raise StorypipeError(
            f"{path} does not exist: is {folder} a story folder written by `storypipe generate`?"
        )
    option_overrides = [f"{key}={json.dumps(value)}" for key, value in options.items() if value is not None]
    return load_config(StorypipeConfig, path, [*(sets or []), *option_overrides])


def _run_with_progress(teller, work: Callable[[Any], Any]) -> Any:
    """Run ``work(teller)`` with a two-line progress display: frames, and denoising steps."""
    from pipeline.orchestrator import Progress as StoryProgress

    with _progress() as progress:
        frames = progress.add_task("frames", total=None)
        steps = progress.add_task("denoising", total=None)
        events = StoryProgress(
            on_frame=lambda index, total, what: progress.update(frames, completed=index, total=total, description=f"frame {index}: {what}"),
            on_step=lambda step, total: progress.update(steps, completed=step, total=total),
            on_note=lambda message: console.print(f"[yellow]note:[/yellow] {message}", highlight=False),
        )  # fmt: skip
        teller.progress = events
        return work(teller)


def _report_models(teller) -> None:
    for task in getattr(teller.captioner, "zero_shot_tasks", ()):
        console.print(f"[yellow]note:[/yellow] no {task} adapter configured (captioner.{task}_adapter): "
                      "the base model answers zero-shot. Train one with `make finetune-llava`.")  # fmt: skip


def _load_seed_image(path: Path, cfg: StorypipeConfig) -> Image.Image:
    from pipeline.io import load_rgb

    if not path.is_file():
        raise StorypipeError(f"seed image {path} does not exist")
    image = load_rgb(path)  # any mode -> RGB; a non-image is a clear error
    shorter, longer = min(image.size), max(image.size)
    scale = 1.0
    if shorter < cfg.story.min_seed_side:
        scale = cfg.story.min_seed_side / shorter
    elif longer > cfg.story.max_seed_side:
        scale = cfg.story.max_seed_side / longer
    if scale != 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        console.print(
            f"[yellow]note:[/yellow] the seed image is {image.width}x{image.height}; resized to {size[0]}x{size[1]}"
        )
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image


def _default_story_folder(caption: str) -> Path:
    slug = "-".join(re.findall(r"[a-z0-9]+", caption.lower()))[:40].strip("-") or "story"
    return Path("stories") / slug


@app.command("generate")
@user_errors
def generate_command(
    image: Annotated[Path | None, typer.Option("--image", help="The seed frame's image.")] = None,
    caption: Annotated[str | None, typer.Option("--caption", help="The seed frame's story caption.")] = None,
    description: Annotated[
        str | None,
        typer.Option(
            "--description", help="The seed frame's literal description (default: the captioner's)."
        ),
    ] = None,
    frames: Annotated[
        int | None, typer.Option("--frames", help="Frames in the story, the seed included (2..20).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Story folder (default: stories/<caption>).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="The story's seed; the same seed gives the same story.")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out folder.")] = False,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue an interrupted story folder.")
    ] = None,
    temperature: TemperatureOption = None,
    guidance_scale: GuidanceOption = None,
    image_guidance_scale: ImageGuidanceOption = None,
    steps: StepsOption = None,
    config: ConfigOption = None,
    preset: PresetOption = None,
    set_: SetOption = None,
) -> None:
    """Write and draw a story from one seed frame: story captions, descriptions and images, frame by frame."""
    from pipeline.config import MAX_FRAMES, MIN_FRAMES
    from pipeline.orchestrator import StoryTeller

    sampling = _sampling_overrides(temperature, guidance_scale, image_guidance_scale, steps)
    started = time.perf_counter()

    if resume is not None:
        # 1. Resume: the folder's own config; continue from its last complete frame.
        cfg = _story_config(resume, set_, **sampling)
        story = StoryTeller.complete_frames(resume)
        teller = wiring.build_story_teller(cfg)
        _report_models(teller)
        story = _run_with_progress(teller, lambda t: t.continue_story(resume, story))
        folder = resume
    else:
        # 1. Check every input before loading a model or writing a file.
        if image is None or caption is None:
            raise typer.BadParameter(
                "give --image and --caption (or --resume DIR)", param_hint="--image/--caption"
            )
        if not caption.strip():
            raise typer.BadParameter("the caption is empty", param_hint="--caption")
        if description is not None and not description.strip():
            raise typer.BadParameter("the description is empty", param_hint="--description")
        if frames is not None and not MIN_FRAMES <= frames <= MAX_FRAMES:
            raise typer.BadParameter(
                f"must be in {MIN_FRAMES}..{MAX_FRAMES}, got {frames}", param_hint="--frames"
            )
        cfg = _config(config, preset, set_, **{"story.frames": frames, "story.seed": seed, **sampling})
        folder = out or _default_story_folder(caption)
        if folder.exists() and any(folder.iterdir()) and not overwrite:
            raise StorypipeError(
                f"{folder} is not empty; pass --overwrite to replace it, or --resume {folder} to continue it"
            )
        seed_image = _load_seed_image(image, cfg)

        # 2. Load the models (a missing one is an error before anything is written).
        teller = wiring.build_story_teller(cfg)
        _report_models(teller)
        for text in (caption, description):
            if text is not None and teller.illustrator.exceeds_prompt_limit(text):
                console.print(
                    f"[yellow]warning:[/yellow] {text!r} is longer than the text encoder reads; it will be truncated"
                )

        # 3. Write the story.
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        save_resolved_config(cfg, folder)
        story = _run_with_progress(teller, lambda t: t.tell(folder, seed_image, caption.strip(), description))

    console.print(
        f"Story of {len(story.frames)} frames in {folder} ({time.perf_counter() - started:.1f}s). "
        f"Open {folder / 'storyboard.html'}"
    )


def _open_story_for_change(
    story: Path, caption: str, position: int, option: str, sets: list[str] | None
) -> StorypipeConfig:
    """Check an edit or insertion before any model loads: the caption, the folder, the frame position."""
    from pipeline.story import Story

    if not caption.strip():
        raise typer.BadParameter("the caption is empty", param_hint="--caption")
    cfg = _story_config(story, sets)
    count = len(Story.load(story).frames)
    if not 0 <= position < count:
        raise typer.BadParameter(f"the story has frames 0..{count - 1}", param_hint=option)
    return cfg


@app.command("edit")
@user_errors
def edit_command(
    story: Annotated[Path, typer.Option("--story", help="A story folder.")],
    frame: Annotated[int, typer.Option("--frame", help="Which frame to edit (0-based).")],
    caption: Annotated[str, typer.Option("--caption", help="The frame's new story caption.")],
    strength: Annotated[
        float | None,
        typer.Option(help="img2img noise, 0-1; 1.0 regenerates fully (default generator.edit_strength)."),
    ] = None,
    propagate: Annotated[
        bool, typer.Option("--propagate", help="Regenerate the later frames from the edited one.")
    ] = False,
    set_: SetOption = None,
) -> None:
    """Replace a frame's story caption and regenerate its description and image; history/ keeps the old ones."""
    cfg = _open_story_for_change(story, caption, frame, "--frame", set_)
    chosen = cfg.generator.edit_strength if strength is None else strength
    if not 0 < chosen <= 1:
        raise typer.BadParameter(f"must be in (0, 1], got {chosen}", param_hint="--strength")
    teller = wiring.build_story_teller(cfg)
    result = _run_with_progress(teller, lambda t: t.edit(story, frame, caption.strip(), chosen, propagate))
    console.print(
        f"Edited frame {frame} of {story} ({len(result.frames)} frames). Open {story / 'storyboard.html'}"
    )


@app.command("insert")
@user_errors
def insert_command(
    story: Annotated[Path, typer.Option("--story", help="A story folder.")],
    after: Annotated[int, typer.Option("--after", help="Insert the new panel after this frame (0-based).")],
    caption: Annotated[str, typer.Option("--caption", help="The new panel's story caption.")],
    set_: SetOption = None,
) -> None:
    """Add a panel between two frames, conditioned on the frames before it, and renumber the rest."""
    cfg = _open_story_for_change(story, caption, after, "--after", set_)
    teller = wiring.build_story_teller(cfg)
    result = _run_with_progress(teller, lambda t: t.insert(story, after, caption.strip()))
    console.print(
        f"Inserted frame {after + 1} into {story} ({len(result.frames)} frames). Open {story / 'storyboard.html'}"
    )


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@app.command("eval")
@user_errors
def eval_command(
    data: Annotated[Path, typer.Option("--data", help="A VIST-layout folder with the ground truth.")],
    out: Annotated[
        Path, typer.Option("--out", help="Results folder (results.json, results.md, plots, cache).")
    ] = Path("runs/eval"),
    split: Annotated[str | None, typer.Option(help="Which split (config eval.split).")] = None,
    max_stories: Annotated[
        int | None, typer.Option("--max-stories", help="Evaluate the first N stories.")
    ] = None,
    config: ConfigOption = None,
    preset: PresetOption = None,
    set_: SetOption = None,
) -> None:
    """Reproduce the source papers' metric tables (text, images, intrinsic) with their baselines."""
    cfg = _config(config, preset, set_, **{"eval.split": split, "eval.max_stories": max_stories})
    started = time.perf_counter()
    with _progress() as progress:
        task = progress.add_task("stories", total=None)
        results = wiring.run_eval(
            cfg, data, out, progress=lambda done, total: progress.update(task, completed=done, total=total)
        )
    if results is not None:  # the main process
        console.print(
            f"Evaluated {results['stories']} stories in {time.perf_counter() - started:.1f}s: {out / 'results.md'}"
        )


@app.command("train-classifier")
@user_errors
def train_classifier_command(
    data: Annotated[Path, typer.Option("--data", help="A VIST-layout folder whose frames carry labels.")],
    out: Annotated[Path, typer.Option("--out", help="Classifier folder.")] = Path("runs/classifier"),
    config: ConfigOption = None,
    preset: PresetOption = None,
    set_: SetOption = None,
) -> None:
    """Train the character/background classifier used for accuracy and F1 (Make-A-Story's metrics)."""
    cfg = _config(config, preset, set_)
    started = time.perf_counter()
    with _progress() as progress:
        task = progress.add_task("train-classifier", total=None)
        scores = wiring.train_classifier(
            cfg, data, out, progress=lambda step, total: progress.update(task, completed=step, total=total)
        )
    shown = ", ".join(f"{key} {value:.3f}" for key, value in scores.items() if isinstance(value, float))
    console.print(f"Classifier written to {out} in {time.perf_counter() - started:.1f}s; validation: {shown}")
    console.print(f"Use it with: --set eval.classifier_model={out}")


@app.command("train-clip")
@user_errors
def train_clip_command(
    data: Annotated[Path, typer.Option("--data", help="A VIST-layout folder: frames with descriptions.")],
    out: Annotated[Path, typer.Option("--out", help="CLIP model folder.")] = Path("runs/clip"),
    config: ConfigOption = None,
    preset: PresetOption = None,
    set_: SetOption = None,
) -> None:
    """Train the tiny CLIP contrastively on (frame, description) pairs, for the CLIP metrics of toy runs."""
    cfg = _config(config, preset, set_)
    started = time.perf_counter()
    with _progress() as progress:
        task = progress.add_task("train-clip", total=None)
        metrics = wiring.train_clip(
            cfg, data, out, progress=lambda step, total: progress.update(task, completed=step, total=total)
        )
    console.print(
        f"CLIP written to {out} in {time.perf_counter() - started:.1f}s; validation text->image top-1 "
        f"{metrics['val_text_to_image_top1']:.3f}, image->text {metrics['val_image_to_text_top1']:.3f} "
        f"(chance {metrics['val_chance']:.3f}, {metrics['val_pool']} candidates)",
        highlight=False,
    )
    console.print(f"Use it with: --set eval.clip_model={out}")


@app.command("train-text-baseline")
@user_errors
def train_text_baseline_command(
    data: Annotated[Path, typer.Option("--data", help="A VIST-layout folder: stories of captions.")],
    out: Annotated[Path, typer.Option("--out", help="Language model folder.")] = Path("runs/text-baseline"),
    config: ConfigOption = None,
    preset: PresetOption = None,
    set_: SetOption = None,
) -> None:
    """Train the tiny text-only LM baseline on story captions (the toy analogue of the paper's MPT row)."""
    cfg = _config(config, preset, set_)
    started = time.perf_counter()
    with _progress() as progress:
        task = progress.add_task("train-text-baseline", total=None)
        metrics = wiring.train_text_baseline(
            cfg, data, out, progress=lambda step, total: progress.update(task, completed=step, total=total)
        )
    val_loss = metrics["val_loss"]
    console.print(
        f"Language model written to {out} in {time.perf_counter() - started:.1f}s; loss "
        f"{metrics['first_loss']:.3f} -> {metrics['final_loss']:.3f}"
        + (f", validation {val_loss:.3f}" if val_loss is not None else ""),
        highlight=False,
    )
    sample = metrics["sample"]
    console.print(
        f"Sample: {' / '.join(sample['previous'])} -> {sample['next']}", highlight=False, markup=False
    )
    console.print(f"Use it with: --set eval.text_baseline_model={out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
