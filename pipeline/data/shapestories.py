"""ShapeStories: a procedurally generated story world in the VIST layout, with known ground truth.

Tiny models can be trained on it on CPU and checked against the truth: each frame's characters,
background and action are recorded as ``labels`` on its entry in the ``images`` list of both the SIS
and the DII file, and the images draw exactly those, in exact colours (no antialiasing).

The design follows Make-A-Story's "referential text" idea: story captions name a character at first
mention and use pronouns afterwards ("Then she jumped over the rock."), so a caption is ambiguous
without the frames before it, while the DII descriptions stay literal ("A red circle jumps over a rock
on a snowy field.").

Files written, read unchanged by :func:`pipeline.data.vist.load_vist_split`::

    OUT/sis/{split}.story-in-sequence.json
    OUT/dii/{split}.description-in-isolation.json
    OUT/images/{split}/{photo_id}.png              # image_size x image_size RGB

Everything random comes from one ``random.Random(cfg.seed)``: the same seed gives the same bytes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageDraw

from pipeline.config import ToyDataConfig
from pipeline.data.vist import (
    SPLITS,
    VistSplitWriter,
    dii_annotation,
    sis_annotation,
)
from pipeline.io import atomic_save_image

RGB = tuple[int, int, int]
Point = tuple[float, float]
Shape = Literal["circle", "square", "triangle", "star", "diamond", "hexagon"]
Feature = Literal["none", "clouds", "sea", "stars", "trunks", "peak"]

# --------------------------------------------------------------------------------------------
# Story structure
# --------------------------------------------------------------------------------------------

STORY_LENGTH = 5  # frames per story: the VIST loader's default story_length
MAX_CAST = 2  # a story has one or two characters
TWO_CHARACTER_PROBABILITY = 0.5
BACKGROUND_CHANGE_PROBABILITY = 0.4  # the background changes at most once, at a frame in 1..STORY_LENGTH-1
KEEP_ACTORS_PROBABILITY = 0.6  # with a two-character cast, a frame keeps the previous frame's actors
CONNECTIVES = ("Then", "Next,", "After that,", "Later,")  # start every story caption after the first
PLURAL_PRONOUN = "they"
VOWELS = "aeiou"  # "an" before these in DII descriptions

# Numeric-string ids, unique across all splits: story i gets FIRST_STORY_ID + i, album FIRST_ALBUM_ID + i,
# and its frames FIRST_PHOTO_ID + i * STORY_LENGTH + order.
FIRST_STORY_ID = 1000
FIRST_ALBUM_ID = 100000
FIRST_PHOTO_ID = 500000
IMAGE_SUFFIX = ".png"

# --------------------------------------------------------------------------------------------
# Colours: characters are saturated, backgrounds muted, decorations white/grey/black (+ a muted tree)
# --------------------------------------------------------------------------------------------

WHITE: RGB = (255, 255, 255)
GREY: RGB = (128, 128, 128)
BLACK: RGB = (0, 0, 0)
TREE_TRUNK: RGB = (105, 80, 60)
TREE_LEAVES: RGB = (70, 105, 75)
DECORATION_COLOURS: tuple[RGB, ...] = (WHITE, GREY, BLACK, TREE_TRUNK, TREE_LEAVES)


@dataclass(frozen=True)
class Character:
    """A cast member: SIS calls it by ``name``/``pronoun``, DII by ``colour`` and ``shape``."""

    name: str
    pronoun: str  # "she" or "he"
    colour: str  # colour word in DII descriptions
    shape: Shape
    rgb: RGB  # exact fill colour of every pixel of the character

    @property
    def dii_noun(self) -> str:
        """Colour and shape, e.g. ``red circle``."""
        return f"{self.colour} {self.shape}"

    @property
    def dii_phrase(self) -> str:
        """With its article, e.g. ``a red circle``, ``an orange hexagon``."""
        article = "an" if self.colour[:1] in VOWELS else "a"
        return f"{article} {self.dii_noun}"


CHARACTERS: tuple[Character, ...] = (
    Character("Rosa", "she", "red", "circle", (220, 30, 30)),
    Character("Bruno", "he", "blue", "square", (30, 70, 220)),
    Character("Gala", "she", "green", "triangle", (20, 170, 50)),
    Character("Yuri", "he", "yellow", "star", (245, 205, 0)),
    Character("Pia", "she", "purple", "diamond", (150, 40, 200)),
    Character("Otto", "he", "orange", "hexagon", (250, 120, 0)),
)


@dataclass(frozen=True)
class Background:
    """A place: a sky band over a ground band, plus one optional fixed ``feature``."""

    name: str  # label, e.g. "snowy_field"
    sis_name: str  # "the snowy field", as in "went to the snowy field"
    sis_location: str  # "in the snowy field", closing the first story caption
    dii_phrase: str  # "on a snowy field", closing every description
    sky: RGB
    ground: RGB
    feature: Feature = "none"
    feature_rgb: RGB | None = None

    @property
    def colours(self) -> tuple[RGB, ...]:
        """Every colour its drawing uses."""
        return (self.sky, self.ground) + ((self.feature_rgb,) if self.feature_rgb is not None else ())


BACKGROUNDS: tuple[Background, ...] = (
    Background("meadow", "the green meadow", "in the green meadow", "in a green meadow",
               sky=(165, 200, 225), ground=(115, 155, 105), feature="clouds", feature_rgb=(238, 240, 242)),
    Background("snowy_field", "the snowy field", "in the snowy field", "on a snowy field",
               sky=(190, 200, 215), ground=(228, 231, 236)),
    Background("beach", "the sandy beach", "on the sandy beach", "on a sandy beach",
               sky=(175, 210, 230), ground=(225, 205, 160), feature="sea", feature_rgb=(95, 140, 170)),
    Background("night_hill", "the starry hill", "on the starry hill", "on a hill at night",
               sky=(35, 40, 75), ground=(55, 75, 60), feature="stars", feature_rgb=(230, 230, 200)),
    Background("forest", "the dark forest", "in the dark forest", "in a forest",
               sky=(140, 165, 145), ground=(100, 85, 65), feature="trunks", feature_rgb=(75, 60, 50)),
    Background("mountain", "the rocky mountain", "on the rocky mountain", "on a rocky mountain",
               sky=(185, 195, 210), ground=(150, 140, 125), feature="peak", feature_rgb=(120, 115, 130)),
)  # fmt: skip


@dataclass(frozen=True)
class Action:
    """What the actors of a frame do; both actors of a two-actor frame do the same.

    Visual signatures (see :func:`_draw_props`): jump = raised above a grey rock; run = white speed
    lines behind; sleep = squashed shape with white z's; wave = black arm and hand; spin = rotated shape
    in grey arcs; dance = tilted shape with black notes; sit = a tree beside and over the actor.
    """

    name: str  # label
    sis_past: str  # "jumped over the rock" (past tense: the same for one or two actors)
    dii_singular: str  # "jumps over a rock"
    dii_plural: str  # "jump over a rock"


ACTIONS: tuple[Action, ...] = (
    Action("jump", "jumped over the rock", "jumps over a rock", "jump over a rock"),
    Action("run", "ran very fast", "runs fast", "run fast"),
    Action("sleep", "fell asleep", "sleeps", "sleep"),
    Action("wave", "waved hello", "waves hello", "wave hello"),
    Action("spin", "spun around", "spins around", "spin around"),
    Action("dance", "danced to the music", "dances to music", "dance to music"),
    Action("sit", "sat under the tree", "sits under a tree", "sit under a tree"),
)

# --------------------------------------------------------------------------------------------
# Geometry, as fractions of the image side (S) or of an actor's radius (r)
# --------------------------------------------------------------------------------------------

HORIZON = 0.68  # sky above y = HORIZON * S, ground below
FOOT_DEPTH = 0.05  # actors stand this far (in S) below the horizon
ACTOR_XS = ((0.5,), (0.3, 0.7))  # centre x of 1 or 2 actors (1 centred, 2 side by side)
ACTOR_RADII = (0.17, 0.13)  # circumradius of 1 or 2 actors
JITTER = 1 / 32  # per-actor random offset, up to this in S along each axis
LINE_WIDTH = 1 / 32  # decoration strokes (at least one pixel)
CIRCLE_VERTICES = 32  # circles are drawn as polygons, like every other shape
STAR_INNER = 0.45  # inner / outer radius of the star
DIAMOND_WIDTH = 0.7  # a diamond is a vertex-up square narrowed to this width
JUMP_HEIGHT = 0.22  # in S
SLEEP_SQUASH = 0.55  # height scale of a sleeping actor
SPIN_DEGREES = 20.0
DANCE_DEGREES = -12.0
ROCK_SIZE = (1.1, 0.5)  # width, height in r
SPEED_LINES = ((-0.4, 0.8), (0.0, 1.0), (0.4, 0.7))  # (height above centre, length) in r, behind a runner
ARM = (1.4, -1.1)  # hand position relative to the centre, in r
HAND_RADIUS = 0.2  # in r
SPIN_ARC_RADIUS = 1.35  # in r
SPIN_ARCS = ((200, 250), (20, 70))  # degrees, PIL convention (clockwise from 3 o'clock)
NOTES = ((-1.2, -0.9), (1.2, -1.3))  # note-head positions relative to the centre, in r
NOTE_HEAD, NOTE_STEM = 0.18, 0.6  # in r
Z_MARKS = ((0.6, -0.6, 0.35), (1.1, -1.1, 0.5))  # (x from centre, y from top, size) in r, above a sleeper
TREE_OFFSET = 1.0  # trunk x from the actor's centre, in r
TREE_TRUNK_SIZE = (0.24, 2.4)  # width, height in r
TREE_CANOPY = (-0.2, 1.0, 0.6)  # canopy centre x offset from trunk, half-width, half-height in r

# Fixed background features (in S).
CLOUDS = ((0.12, 0.10, 0.38, 0.20), (0.60, 0.18, 0.85, 0.28))  # ellipse boxes
SEA_DEPTH = 0.07  # sea band just above the horizon
STAR_DOTS = ((0.08, 0.08), (0.25, 0.20), (0.42, 0.06), (0.58, 0.22), (0.74, 0.10), (0.90, 0.30), (0.15, 0.40))
TRUNK_XS = (0.08, 0.35, 0.62, 0.90)
TRUNK_WIDTH = 0.05
PEAK = ((0.25, HORIZON), (0.55, 0.25), (0.85, HORIZON))


# --------------------------------------------------------------------------------------------
# Planning: what each frame shows
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FramePlan:
    """One frame of a story; ``actors`` are in ``CHARACTERS`` order."""

    actors: tuple[Character, ...]
    background: Background
    action: Action
    jitter: tuple[Point, ...]  # (dx, dy) per actor, in S
    connective: str  # "" for the first frame


def plan_story(rng: random.Random) -> tuple[FramePlan, ...]:
    """Draw one story: a cast of 1-2, a background that changes at most once, an action per frame."""
    cast_size = MAX_CAST if rng.random() < TWO_CHARACTER_PROBABILITY else 1
    cast = tuple(CHARACTERS[i] for i in sorted(rng.sample(range(len(CHARACTERS)), cast_size)))
    # Non-empty subsets of the cast, in CHARACTERS order: [(A,)], or [(A,), (B,), (A, B)] for two.
    subsets = [cast] if cast_size == 1 else [cast[:1], cast[1:], cast]

    first_background = rng.choice(BACKGROUNDS)
    change_at = rng.randint(1, STORY_LENGTH - 1) if rng.random() < BACKGROUND_CHANGE_PROBABILITY else None
    second_background = rng.choice([b for b in BACKGROUNDS if b != first_background])

    frames: list[FramePlan] = []
    for index in range(STORY_LENGTH):
        if index == 0:
            actors = rng.choice(subsets)
        elif len(subsets) == 1 or rng.random() < KEEP_ACTORS_PROBABILITY:
            actors = frames[-1].actors
        else:
            actors = rng.choice([s for s in subsets if s != frames[-1].actors])
        action = rng.choice([a for a in ACTIONS if not frames or a != frames[-1].action])
        jitter = tuple((rng.uniform(-JITTER, JITTER), rng.uniform(-JITTER, JITTER)) for _ in actors)
        changed = change_at is not None and index >= change_at
        frames.append(
            FramePlan(
                actors=actors,
                background=second_background if changed else first_background,
                action=action,
                jitter=jitter,
                connective=rng.choice(CONNECTIVES) if index else "",
            )
        )
    return tuple(frames)


# --------------------------------------------------------------------------------------------
# Text and labels
# --------------------------------------------------------------------------------------------


def story_captions(frames: tuple[FramePlan, ...]) -> list[str]:
    """SIS captions: names at first mention, a pronoun when the actors are the previous frame's.

    "Rosa jumped over the rock in the snowy field." / "Then she fell asleep." /
    "Later, Rosa and Bruno went to the sandy beach and waved hello."
    """
    captions: list[str] = []
    mentioned: set[str] = set()
    previous: FramePlan | None = None
    for frame in frames:
        same_actors = previous is not None and frame.actors == previous.actors
        if same_actors and all(c.name in mentioned for c in frame.actors):
            subject = PLURAL_PRONOUN if len(frame.actors) > 1 else frame.actors[0].pronoun
        else:
            subject = " and ".join(c.name for c in frame.actors)
        past = frame.action.sis_past
        if previous is None:
            text = f"{subject} {past} {frame.background.sis_location}"
        elif frame.background != previous.background:
            text = f"{frame.connective} {subject} went to {frame.background.sis_name} and {past}"
        else:
            text = f"{frame.connective} {subject} {past}"
        captions.append(_sentence(text))
        mentioned.update(c.name for c in frame.actors)
        previous = frame
    return captions


def describe_frame(frame: FramePlan) -> str:
    """DII description, literal and present tense: ``A red circle and a blue square dance in a forest.``"""
    nouns = " and ".join(c.dii_phrase for c in frame.actors)
    verb = frame.action.dii_singular if len(frame.actors) == 1 else frame.action.dii_plural
    return _sentence(f"{nouns} {verb} {frame.background.dii_phrase}")


def frame_labels(frame: FramePlan) -> dict[str, Any]:
    return {
        "characters": [c.name for c in frame.actors],
        "background": frame.background.name,
        "action": frame.action.name,
    }


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


# --------------------------------------------------------------------------------------------
# Drawing (PIL ImageDraw on RGB never antialiases, so every character pixel has its exact colour)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Placed:
    """An actor placed in pixels: horizontal centre, lowest point, circumradius, pose."""

    character: Character
    cx: float
    bottom: float  # lowest point of the shape, after any lift
    radius: float
    lift: float  # how far the actor is raised above its standing position (jump)
    degrees: float  # clockwise rotation (spin, dance)
    squash: float  # height scale (sleep)

    @property
    def cy(self) -> float:
        """Where decorations treat the centre: one (squashed) radius above the lowest point."""
        return self.bottom - self.radius * self.squash

    @property
    def top(self) -> float:
        return self.bottom - 2 * self.radius * self.squash


def render_frame(frame: FramePlan, size: int) -> Image.Image:
    """The frame as a ``size`` x ``size`` RGB image: background, props behind, actors, props in front."""
    image = Image.new("RGB", (size, size), frame.background.sky)
    draw = ImageDraw.Draw(image)
    _draw_background(draw, frame.background, size)
    placed = _place_actors(frame, size)
    line = max(1, round(LINE_WIDTH * size))
    for actor in placed:
        _draw_props(draw, frame.action.name, actor, line, behind=True)
    for actor in placed:
        draw.polygon(_outline(actor), fill=actor.character.rgb)
    for actor in placed:
        _draw_props(draw, frame.action.name, actor, line, behind=False)
    return image


def _place_actors(frame: FramePlan, size: int) -> list[_Placed]:
    count = len(frame.actors)
    action = frame.action.name
    lift = JUMP_HEIGHT * size if action == "jump" else 0.0
    degrees = SPIN_DEGREES if action == "spin" else DANCE_DEGREES if action == "dance" else 0.0
    squash = SLEEP_SQUASH if action == "sleep" else 1.0
    return [
        _Placed(
            character=character,
            cx=(x + dx) * size,
            bottom=(HORIZON + FOOT_DEPTH + dy) * size - lift,
            radius=ACTOR_RADII[count - 1] * size,
            lift=lift,
            degrees=degrees,
            squash=squash,
        )
        for character, x, (dx, dy) in zip(frame.actors, ACTOR_XS[count - 1], frame.jitter, strict=True)
    ]


def _outline(actor: _Placed) -> list[Point]:
    """The actor's polygon: its shape rotated, squashed, then moved so its lowest point is at ``bottom``."""
    points = _unit_shape(actor.character.shape)
    turn = math.radians(actor.degrees)
    cos, sin = math.cos(turn), math.sin(turn)
    points = [(x * cos - y * sin, (x * sin + y * cos) * actor.squash) for x, y in points]
    shift_y = actor.bottom / actor.radius - max(y for _, y in points)
    return [(actor.cx + x * actor.radius, (y + shift_y) * actor.radius) for x, y in points]


def _unit_shape(shape: Shape) -> list[Point]:
    """Vertices of ``shape`` with circumradius 1 around the origin (y points down)."""
    if shape == "circle":
        return _regular(CIRCLE_VERTICES, 0.0)
    if shape == "square":
        return _regular(4, 45.0)
    if shape == "triangle":
        return _regular(3, 0.0)
    if shape == "diamond":
        return [(x * DIAMOND_WIDTH, y) for x, y in _regular(4, 0.0)]
    if shape == "hexagon":
        return _regular(6, 30.0)
    if shape == "star":
        outer = _regular(5, 0.0)
        inner = _regular(5, 36.0)
        return [
            p
            for o, (ix, iy) in zip(outer, inner, strict=True)
            for p in (o, (ix * STAR_INNER, iy * STAR_INNER))
        ]
    raise ValueError(f"unknown shape {shape!r}")


def _regular(vertices: int, start_degrees: float) -> list[Point]:
    """A regular polygon, the first vertex ``start_degrees`` clockwise from straight up."""
    angles = (math.radians(start_degrees + 360.0 * k / vertices) for k in range(vertices))
    return [(math.sin(a), -math.cos(a)) for a in angles]


def _draw_background(draw: ImageDraw.ImageDraw, background: Background, size: int) -> None:
    """Ground band below the horizon (the sky is the image's fill) and the background's feature."""
    horizon = round(HORIZON * size)
    draw.rectangle((0, horizon, size - 1, size - 1), fill=background.ground)
    colour = background.feature_rgb
    if background.feature == "clouds":
        for box in CLOUDS:
            draw.ellipse([v * size for v in box], fill=colour)
    elif background.feature == "sea":
        draw.rectangle((0, round((HORIZON - SEA_DEPTH) * size), size - 1, horizon - 1), fill=colour)
    elif background.feature == "stars":
        dot = max(1, size // 64)
        for x, y in STAR_DOTS:
            left, top = round(x * size), round(y * size)
            draw.rectangle((left, top, left + dot - 1, top + dot - 1), fill=colour)
    elif background.feature == "trunks":
        for x in TRUNK_XS:
            draw.rectangle((round(x * size), 0, round((x + TRUNK_WIDTH) * size), horizon - 1), fill=colour)
    elif background.feature == "peak":
        draw.polygon([(x * size, y * size) for x, y in PEAK], fill=colour)


def _draw_props(draw: ImageDraw.ImageDraw, action: str, actor: _Placed, line: int, behind: bool) -> None:
    """An action's decorations for one actor, either the layer behind the actors or the one in front."""
    r, cx, cy = actor.radius, actor.cx, actor.cy
    if behind and action == "jump":
        rock_bottom = actor.bottom + actor.lift  # on the ground the actor jumped from
        width, height = ROCK_SIZE[0] * r, ROCK_SIZE[1] * r
        draw.ellipse((cx - width / 2, rock_bottom - height, cx + width / 2, rock_bottom), fill=GREY)
    elif behind and action == "run":
        for dy, length in SPEED_LINES:
            y, end = cy + dy * r, cx - r * 1.1
            draw.line((end - length * r, y, end, y), fill=WHITE, width=line)
    elif behind and action == "wave":
        hand = (cx + ARM[0] * r, cy + ARM[1] * r)
        draw.line((cx, cy, *hand), fill=BLACK, width=line)
        reach = HAND_RADIUS * r
        draw.ellipse((hand[0] - reach, hand[1] - reach, hand[0] + reach, hand[1] + reach), fill=BLACK)
    elif behind and action == "spin":
        reach = SPIN_ARC_RADIUS * r
        for start, end in SPIN_ARCS:
            draw.arc((cx - reach, cy - reach, cx + reach, cy + reach), start, end, fill=GREY, width=line)
    elif behind and action == "sit":
        trunk_x = cx + TREE_OFFSET * r
        trunk_top = actor.bottom - TREE_TRUNK_SIZE[1] * r
        half = TREE_TRUNK_SIZE[0] * r / 2
        draw.rectangle((trunk_x - half, trunk_top, trunk_x + half, actor.bottom), fill=TREE_TRUNK)
        canopy_x, half_w, half_h = trunk_x + TREE_CANOPY[0] * r, TREE_CANOPY[1] * r, TREE_CANOPY[2] * r
        canopy = (canopy_x - half_w, trunk_top - half_h, canopy_x + half_w, trunk_top + half_h)
        draw.ellipse(canopy, fill=TREE_LEAVES)
    elif not behind and action == "dance":
        head = NOTE_HEAD * r
        for dx, dy in NOTES:
            x, y = cx + dx * r, cy + dy * r
            draw.ellipse((x - head, y - head, x + head, y + head), fill=BLACK)
            draw.line((x + head, y, x + head, y - NOTE_STEM * r), fill=BLACK, width=line)
    elif not behind and action == "sleep":
        for dx, dy, mark in Z_MARKS:
            left, top = cx + dx * r, actor.top + dy * r
            right, bottom = left + mark * r, top + mark * r
            draw.line(((left, top), (right, top), (left, bottom), (right, bottom)), fill=WHITE, width=line)


# --------------------------------------------------------------------------------------------
# Writing the dataset
# --------------------------------------------------------------------------------------------


def split_sizes(cfg: ToyDataConfig) -> dict[str, int]:
    """Stories per split: test and val get their fractions of ``cfg.stories`` (rounded), train the rest."""
    test = min(round(cfg.stories * cfg.test_fraction), cfg.stories)
    val = min(round(cfg.stories * cfg.val_fraction), cfg.stories - test)
    return {"train": cfg.stories - val - test, "val": val, "test": test}


def generate_shapestories(
    out: Path, cfg: ToyDataConfig, progress: Callable[[int], None] | None = None
) -> dict[str, int]:
    """Write ``cfg.stories`` ShapeStories under ``out`` in the VIST layout; return stories per split.

    Stories are drawn in order from ``random.Random(cfg.seed)`` and numbered across splits (train,
    then val, then test). ``progress(n)`` is called with the number of stories just finished.
    Every file is written atomically; existing files with the same names are replaced.
    """
    out = Path(out)
    rng = random.Random(cfg.seed)
    sizes = split_sizes(cfg)
    story_number = 0
    for split in SPLITS:
        docs = VistSplitWriter(out, split)
        for _ in range(sizes[split]):
            story_id, album_id = str(FIRST_STORY_ID + story_number), str(FIRST_ALBUM_ID + story_number)
            frames = plan_story(rng)
            first_photo = FIRST_PHOTO_ID + story_number * STORY_LENGTH
            photo_ids = [str(first_photo + order) for order in range(STORY_LENGTH)]
            captions = story_captions(frames)
            for order, (frame, caption, photo_id) in enumerate(zip(frames, captions, photo_ids, strict=True)):
                docs.sis.append(sis_annotation(story_id, album_id, photo_id, order, caption))
                docs.dii.append(dii_annotation(album_id, photo_id, order, describe_frame(frame)))
                docs.images.append({"id": photo_id, "album_id": album_id, "labels": frame_labels(frame)})
                atomic_save_image(
                    docs.folder / f"{photo_id}{IMAGE_SUFFIX}", render_frame(frame, cfg.image_size)
                )
            docs.albums.append({"id": album_id, "title": f"ShapeStories {story_id}", "primary": photo_ids[0]})
            story_number += 1
            if progress is not None:
                progress(1)
        docs.write()
    return sizes
