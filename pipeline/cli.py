"""The ``storypipe`` command line.

Every command takes ``--config FILE`` or ``--preset NAME`` (a file in ``configs/``) and any number of
``--set section.key=value`` overrides. Command options that mirror a config key (``--image-size``...)
are applied last, and the resolved config is written into every output folder.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from pipeline import wiring
from pipeline.config import config_to_dict, save_resolved_config
from pipeline.errors import StorypipeError
from pipeline.wiring import StorypipeConfig, resolve_config

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
    from pipeline.shapestories import generate_shapestories

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
    from pipeline.llava_data import prepare_llava

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
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest checkpoint in --out.")
    ] = False,
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
    from pipeline.vist import load_rgb

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


@app.command("finetune-storygen")
@user_errors
def finetune_storygen_command(
    data: Annotated[
        Path, typer.Option("--data", help="A VIST-layout folder (VIST, ShapeStories, converted *SV).")
    ],
    split: Annotated[str, typer.Option(help="Which split to train on.")] = "train",
    out: Annotated[Path, typer.Option("--out", help="Output model folder.")] = Path("runs/storygen"),
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest checkpoint in --out.")
    ] = False,
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
    from pipeline.storysv import convert_storysv

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
