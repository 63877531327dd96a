"""Synthetic "shapes" visual question answering data, deterministic by seed.

Scenes hold 1-5 flat shapes (circle, square, triangle) in six named colours on light, sometimes noisy
backgrounds, optionally with a printed word or number. Every (shape, colour) pair occurs at most once
per scene, so every question we ask has exactly one correct, short answer derived from the scene
description rather than from the pixels. Conversations use the Idefics2 chat message format (docs/numerics.md §6.6).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 175),
    "orange": (250, 135, 10),
}
WORDS = ("CAT", "DOG", "SUN", "STOP", "GO", "HI", "BOX", "TREE", "MOON", "STAR", "FISH", "BIRD", "CAKE",
         "HOME", "OK", "ZOO", *(str(n) for n in range(1, 21)))
BACKGROUNDS = ((255, 255, 255), (255, 255, 255), (245, 245, 245), (235, 240, 250), (250, 245, 230),
               (235, 250, 235), (250, 235, 240))
TEXT_COLORS = ((0, 0, 0), (60, 60, 60), (20, 20, 90))
TEXT_SIZE = (0.20, 0.24)  # font size range, as a fraction of the canvas's short side: large enough to read at 128 px
CANVASES = ((224, 224), (224, 224), (224, 224), (160, 160), (192, 192), (256, 256), (224, 176), (176, 224))
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
MAX_SHAPES = 5
TWO_IMAGE_FRACTION = 0.2  # of conversations, or of batches in training (one image count per batch)

# Question types; evaluation reports accuracy per type and per group.
SINGLE_IMAGE_TYPES = ("color", "shape", "count", "count_kind", "position", "text", "describe")
TWO_IMAGE_TYPES = ("difference", "more")
QUESTION_TYPES = SINGLE_IMAGE_TYPES + TWO_IMAGE_TYPES
# JSON answer forms (`json_form`): the key each answerable type's value goes under.
JSON_KEYS = {"color": "color", "shape": "shape", "count": "count", "count_kind": "count"}
JSON_SUFFIX = " Answer in JSON."
JSON_TYPES = tuple(f"{t}_json" for t in JSON_KEYS)  # held-out types of the JSON variants (`json_items`)
GROUPS = {"color": "colour", "shape": "shape", "count": "counting", "count_kind": "counting",
          "position": "position", "text": "printed text", "describe": "describe",
          "difference": "two-image", "more": "two-image", **{t: "json" for t in JSON_TYPES}}


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    cx: int
    cy: int
    r: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw an image and to answer questions about it."""

    width: int
    height: int
    background: tuple[int, int, int]
    noise_std: float
    noise_seed: int
    shapes: tuple[Shape, ...]
    text: str | None = None
    text_xy: tuple[int, int] = (0, 0)
    text_size: int = 0
    text_color: tuple[int, int, int] = (0, 0, 0)


@dataclass
class Sample:
    """One conversation: images in order of their `<image>` placeholders, chat messages, question types,
    and the scenes the images were rendered from (for the grounding targets, `patch_contents`)."""

    images: list[Image.Image]
    messages: list[dict[str, Any]]
    question_types: list[str] = field(default_factory=list)
    scenes: list[Scene] = field(default_factory=list)


@dataclass(frozen=True)
class EvalItem:
    """A single-turn held-out question; `messages` holds only the user turn."""

    images: tuple[Image.Image, ...]
    messages: tuple[dict[str, Any], ...]
    question: str
    answer: str
    question_type: str
    scenes: tuple[Scene, ...] = ()  # what the images show, where a caller needs more than the answer


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _text_box(text: str, size: int, xy: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the inked pixels of `text` drawn at `xy`."""
    left, top, right, bottom = _font(size).getbbox(text)
    return xy[0] + left, xy[1] + top, xy[0] + right, xy[1] + bottom


def _fits(cx: int, cy: int, r: int, placed: list[tuple[int, int, int]], box: tuple[int, int, int, int] | None,
          width: int, height: int) -> bool:
    if cx - r < 2 or cy - r < 2 or cx + r > width - 2 or cy + r > height - 2:
        return False
    if any(math.hypot(cx - x, cy - y) < r + pr + 6 for x, y, pr in placed):
        return False
    if box is not None:
        x0, y0, x1, y1 = box
        if cx + r > x0 - 4 and cx - r < x1 + 4 and cy + r > y0 - 4 and cy - r < y1 + 4:
            return False
    return True


def _place(rng: random.Random, kind: str, color: str, placed: list[tuple[int, int, int]],
           box: tuple[int, int, int, int] | None, width: int, height: int) -> Shape | None:
    """Rejection-sample a non-overlapping position; shrink the radius when the canvas is crowded."""
    scale = min(width, height) / 224
    for attempt in range(60):
        r_max = 40 if attempt < 30 else 24
        r = max(8, round(rng.uniform(12, r_max) * scale))
        cx, cy = rng.randint(r, width - r), rng.randint(r, height - r)
        if _fits(cx, cy, r, placed, box, width, height):
            return Shape(kind, color, cx, cy, r)
    return None


def sample_scene(rng: random.Random, n_shapes: int | None = None, with_text: bool | None = None,
                 max_shapes: int = MAX_SHAPES) -> Scene:
    """A random scene with `n_shapes` shapes, or 1-`max_shapes` drawn uniformly; the count may come out
    lower only if placement fails (never seen)."""
    width, height = rng.choice(CANVASES)
    n = n_shapes if n_shapes is not None else rng.randint(1, max_shapes)
    has_text = with_text if with_text is not None else rng.random() < 0.3
    text, text_xy, text_size, box = None, (0, 0), 0, None
    if has_text:
        text = rng.choice(WORDS)
        low, high = TEXT_SIZE
        text_size = rng.randint(round(low * min(width, height)), round(high * min(width, height)))
        left, top, right, bottom = _text_box(text, text_size, (0, 0))
        text_xy = (rng.randint(4, width - (right - left) - 4), rng.randint(4, height - (bottom - top) - 8))
        box = _text_box(text, text_size, text_xy)
    pairs = rng.sample([(k, c) for k in SHAPES for c in COLORS], n)
    placed: list[tuple[int, int, int]] = []
    shapes: list[Shape] = []
    for kind, color in pairs:
        shape = _place(rng, kind, color, placed, box, width, height)
        if shape is not None:
            shapes.append(shape)
            placed.append((shape.cx, shape.cy, shape.r))
    noisy = rng.random() < 0.3
    return Scene(width=width, height=height, background=rng.choice(BACKGROUNDS),
                 noise_std=rng.uniform(3, 10) if noisy else 0.0, noise_seed=rng.randrange(2**31),
                 shapes=tuple(shapes), text=text, text_xy=text_xy, text_size=text_size,
                 text_color=rng.choice(TEXT_COLORS))


def render(scene: Scene) -> Image.Image:
    """Draw the scene as an RGB image (pure function of the scene, so answers always match pixels)."""
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        rgb = COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse((s.cx - s.r, s.cy - s.r, s.cx + s.r, s.cy + s.r), fill=rgb)
        elif s.kind == "square":
            half = round(s.r * 0.85)
            draw.rectangle((s.cx - half, s.cy - half, s.cx + half, s.cy + half), fill=rgb)
        else:
            h = s.r * math.sqrt(3) / 2
            draw.polygon([(s.cx, s.cy - s.r), (s.cx - h, s.cy + s.r / 2), (s.cx + h, s.cy + s.r / 2)], fill=rgb)
    if scene.text is not None:
        draw.text(scene.text_xy, scene.text, fill=scene.text_color, font=_font(scene.text_size))
    if scene.noise_std > 0:
        noise = np.random.default_rng(scene.noise_seed).normal(0, scene.noise_std, (scene.height, scene.width, 1))
        pixels = np.asarray(image, dtype=np.float32) + noise
        image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")
    return image


def _covers(shape: Shape, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Which points (x, y) in canvas pixels lie inside `shape`, with `render`'s geometry."""
    dx, dy = x - shape.cx, y - shape.cy
    if shape.kind == "circle":
        return dx * dx + dy * dy <= shape.r * shape.r
    if shape.kind == "square":
        half = round(shape.r * 0.85)
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # apex (0, -r), base at dy = r/2; the half-width grows linearly from the apex to h at the base
    half_base = shape.r * math.sqrt(3) / 2
    return (dy >= -shape.r) & (dy <= shape.r / 2) & (np.abs(dx) <= half_base * (dy + shape.r) / (1.5 * shape.r))


def patch_contents(scene: Scene, grid: int, samples: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """What lies under each cell of a `grid` x `grid` split of the image, row-major as the vision
    tower orders its patches (the processor squashes every canvas to a square).

    Each cell is tested at `samples` x `samples` points. Returns (shape_index (grid², ) int64: the
    index in `scene.shapes` of the shape covering most of the cell's points, -1 for none;
    on_text (grid², ) bool: some point lies in the printed text's box).
    """
    n = grid * samples
    u = (np.arange(n) + 0.5) / n
    x = np.broadcast_to(u[None, :] * scene.width, (n, n))  # (n, n) point coordinates, row-major
    y = np.broadcast_to(u[:, None] * scene.height, (n, n))
    shape_index = np.full(grid * grid, -1, dtype=np.int64)
    if scene.shapes:
        hits = np.stack([_covers(s, x, y).reshape(grid, samples, grid, samples).sum(axis=(1, 3)).reshape(-1)
                         for s in scene.shapes])  # (shapes, grid²) points covered per cell
        shape_index = np.where(hits.max(axis=0) > 0, hits.argmax(axis=0), -1)
    on_text = np.zeros(grid * grid, dtype=bool)
    if scene.text is not None:
        left, top, right, bottom = _text_box(scene.text, scene.text_size, scene.text_xy)
        inside = (x >= left) & (x <= right) & (y >= top) & (y <= bottom)
        on_text = inside.reshape(grid, samples, grid, samples).any(axis=(1, 3)).reshape(-1)
    return shape_index, on_text


def _article(shape: Shape) -> str:
    return f"{'an' if shape.color[0] in 'aeiou' else 'a'} {shape.name}"


def describe(scene: Scene) -> str:
    """Left-to-right list of shapes: "A red circle, a blue square and a green triangle." """
    names = [_article(s) for s in sorted(scene.shapes, key=lambda s: s.cx)]
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return text[0].upper() + text[1:] + "."


def colour_question(shape: Shape) -> tuple[str, str]:
    """("What color is the circle?", "Red."): only asked of a shape whose kind is unique in its image."""
    return f"What color is the {shape.kind}?", f"{shape.color.capitalize()}."


def single_image_question(rng: random.Random, scene: Scene, qtype: str) -> tuple[str, str] | None:
    """(question, answer) of the given type, or None when that question would be ambiguous here."""
    shapes = scene.shapes
    if qtype == "color":
        kinds = [k for k in SHAPES if sum(s.kind == k for s in shapes) == 1]
        if not kinds:
            return None
        kind = rng.choice(kinds)
        return colour_question(next(s for s in shapes if s.kind == kind))
    if qtype == "shape":
        colors = [c for c in COLORS if sum(s.color == c for s in shapes) == 1]
        if not colors:
            return None
        color = rng.choice(colors)
        kind = next(s.kind for s in shapes if s.color == color)
        return f"What shape is {color}?", f"{kind.capitalize()}."
    if qtype == "count":
        return "How many shapes are there?", f"{len(shapes)}."
    if qtype == "count_kind":
        kind = rng.choice(SHAPES)
        return f"How many {kind}s are there?", f"{sum(s.kind == kind for s in shapes)}."
    if qtype == "position":
        side = rng.choice(("left", "right"))
        ordered = sorted(shapes, key=lambda s: s.cx, reverse=side == "right")
        if len(ordered) > 1 and abs(ordered[0].cx - ordered[1].cx) < 0.08 * scene.width:
            return None  # too close to call: the answer must be visible at a glance
        return f"Which shape is on the {side}?", f"The {ordered[0].name}."
    if qtype == "text":
        if scene.text is None:
            return None
        return "What is written in the image?", f"{scene.text}."
    if qtype == "describe":
        return "Describe the image.", describe(scene)
    raise ValueError(f"not a single-image question type: {qtype!r}")


def json_form(qtype: str, question: str, answer: str) -> tuple[str, str]:
    """("What color is the circle? Answer in JSON.", '{"color": "red"}') for a colour, shape or
    counting question and its plain answer ("Red.", "Circle.", "3.").

    The value is the plain answer's word in lower case (a count as a JSON number), written by
    `json.dumps` with its default ", " and ": " separators: the text a JSON-schema constraint lets
    through, so constrained decoding follows what the model was taught.
    """
    if qtype not in JSON_KEYS:
        raise ValueError(f"question type {qtype!r} has no JSON form; types with one: {sorted(JSON_KEYS)}")
    word = answer.removesuffix(".").lower()
    value: str | int = int(word) if JSON_KEYS[qtype] == "count" else word
    return question + JSON_SUFFIX, json.dumps({JSON_KEYS[qtype]: value})


def _modified_scene(rng: random.Random, scene: Scene) -> tuple[Scene, str]:
    """The second image of a "difference" pair: one shape recoloured, added or removed."""
    shapes = list(scene.shapes)
    used = {(s.kind, s.color) for s in shapes}
    options = ["recolor", "add"] + (["remove"] if len(shapes) > 1 else [])
    change = rng.choice(options)
    if change == "add" and len(shapes) < MAX_SHAPES:
        box = _text_box(scene.text, scene.text_size, scene.text_xy) if scene.text is not None else None
        kind, color = rng.choice([(k, c) for k in SHAPES for c in COLORS if (k, c) not in used])
        new = _place(rng, kind, color, [(s.cx, s.cy, s.r) for s in shapes], box, scene.width, scene.height)
        if new is not None:
            return replace(scene, shapes=(*shapes, new)), f"The second image has an extra {new.name}."
    if change == "remove":
        index = rng.randrange(len(shapes))
        gone = shapes.pop(index)
        return replace(scene, shapes=tuple(shapes)), f"The second image has no {gone.name}."
    index = rng.randrange(len(shapes))
    old = shapes[index]
    colors = [c for c in COLORS if c != old.color and (old.kind, c) not in used]
    new_color = rng.choice(colors)
    shapes[index] = replace(old, color=new_color)
    return replace(scene, shapes=tuple(shapes)), f"The {old.name} is {new_color} in the second image."


def two_image_question(rng: random.Random, qtype: str) -> tuple[Scene, Scene, str, str]:
    """(first scene, second scene, question, answer) for "difference" or "more"."""
    if qtype == "difference":
        first = sample_scene(rng)
        second, answer = _modified_scene(rng, first)
        return first, second, "What's the difference between these two images?", answer
    if qtype == "more":
        first = sample_scene(rng)
        second = sample_scene(rng)
        while len(second.shapes) == len(first.shapes):
            second = sample_scene(rng)
        which = "first" if len(first.shapes) > len(second.shapes) else "second"
        return first, second, "Which image has more shapes?", f"The {which} image."
    raise ValueError(f"not a two-image question type: {qtype!r}")


def _user(text: str, n_images: int) -> dict[str, Any]:
    return {"role": "user", "content": [*({"type": "image"} for _ in range(n_images)),
                                        {"type": "text", "text": text}]}


def _assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _answerable(rng: random.Random, scene: Scene, qtype: str) -> tuple[str, str, str]:
    """(question, answer, type) of `qtype`, or of counting when the scene cannot support `qtype`."""
    qa = single_image_question(rng, scene, qtype)
    if qa is None:
        qtype, qa = "count", single_image_question(rng, scene, "count")
    assert qa is not None
    return qa[0], qa[1], qtype


def question_mix(weights: dict[str, int]) -> tuple[str, ...]:
    """Single-image question types to draw from uniformly, each repeated by its integer weight
    (unnamed types weigh 1), in `SINGLE_IMAGE_TYPES` order: {"position": 4} asks about position
    4 times as often as about colour."""
    unknown = sorted(set(weights) - set(SINGLE_IMAGE_TYPES))
    if unknown or any(not isinstance(w, int) or w < 0 for w in weights.values()):
        raise ValueError(f"question weights must be non-negative integers for types in {SINGLE_IMAGE_TYPES}, "
                         f"got {weights}")
    mix = tuple(t for t in SINGLE_IMAGE_TYPES for _ in range(weights.get(t, 1)))
    if not mix:
        raise ValueError("question weights leave no single-image question type")
    return mix


def sample_conversation(rng: random.Random, max_turns: int = 3, two_images: bool | None = None,
                        max_shapes: int = MAX_SHAPES, types: Sequence[str] = SINGLE_IMAGE_TYPES,
                        json_fraction: float = 0.0) -> Sample:
    """A training conversation: 1-`max_turns` questions about one image, or 1-2 about an image pair
    (`two_images`; None draws it, `TWO_IMAGE_FRACTION` pairs).

    Several answers per image give more supervised tokens per (expensive) image encoding.
    `max_shapes` caps the shapes of a single image (the training curriculum); image pairs keep
    the full range. Single-image questions are drawn uniformly from `types` (`question_mix`).
    A colour, shape or counting question is asked in its JSON form (`json_form`) with probability
    `json_fraction`; at 0 no draw is made, so the stream of a seed is the one earlier stages saw.
    """
    if two_images if two_images is not None else rng.random() < TWO_IMAGE_FRACTION:
        types = rng.sample(TWO_IMAGE_TYPES, rng.randint(1, 2))
        first, second, question, answer = two_image_question(rng, types[0])
        messages = [_user(question, 2), _assistant(answer)]
        if len(types) > 1:
            n1, n2 = len(first.shapes), len(second.shapes)
            if n1 != n2:
                messages += [_user("Which image has more shapes?", 0),
                             _assistant(f"The {'first' if n1 > n2 else 'second'} image.")]
            else:
                types = types[:1]
        return Sample([render(first), render(second)], messages, list(types), [first, second])
    scene = sample_scene(rng, max_shapes=max_shapes)
    wanted = ["text"] if scene.text is not None and rng.random() < 0.5 else []
    wanted += [rng.choice(types) for _ in range(rng.randint(1, max_turns) - len(wanted))]
    messages: list[dict[str, Any]] = []
    types: list[str] = []
    for turn, qtype in enumerate(wanted):
        question, answer, qtype = _answerable(rng, scene, qtype)
        if json_fraction > 0 and qtype in JSON_KEYS and rng.random() < json_fraction:
            question, answer = json_form(qtype, question, answer)
        messages += [_user(question, 1 if turn == 0 else 0), _assistant(answer)]
        types.append(qtype)
    return Sample([render(scene)], messages, types, [scene])


def make_eval_items(seed: int, n: int) -> list[EvalItem]:
    """`n` single-turn questions cycling through every question type (text scenes forced for "text")."""
    rng = random.Random(seed)
    items: list[EvalItem] = []
    for index in range(n):
        qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
        if qtype in TWO_IMAGE_TYPES:
            first, second, question, answer = two_image_question(rng, qtype)
            images: tuple[Image.Image, ...] = (render(first), render(second))
        else:
            qa = None
            while qa is None:
                scene = sample_scene(rng, with_text=True if qtype == "text" else None)
                qa = single_image_question(rng, scene, qtype)
            question, answer = qa
            images = (render(scene),)
        items.append(EvalItem(images, (_user(question, len(images)),), question, answer, qtype))
    return items


def json_items(items: Sequence[EvalItem]) -> list[EvalItem]:
    """The JSON forms of the colour, shape and counting questions among `items` (types "color_json", ...);
    `evaluate.score` parses their answers with `json.loads`."""
    out: list[EvalItem] = []
    for item in items:
        if item.question_type in JSON_KEYS:
            question, answer = json_form(item.question_type, item.question, item.answer)
            out.append(replace(item, messages=(_user(question, len(item.images)),), question=question,
                               answer=answer, question_type=f"{item.question_type}_json"))
    return out


def make_colour_binding_items(seed: int, n: int) -> list[EvalItem]:
    """`n` colour questions about scenes of 2 and 3 shapes (alternating) whose kinds and colours are all
    different, so every other shape's colour is a wrong answer the model could give. The held-out mix
    also asks about single shapes, which needs no binding; a model that looks for any colour in the
    image scores far higher there (docs/experiments/shapes-vqa-log.md: 93.5% against 77.5%)."""
    rng = random.Random(seed)
    items: list[EvalItem] = []
    while len(items) < n:
        count = 2 + len(items) % 2
        scene = sample_scene(rng, n_shapes=count, with_text=False)
        if len({s.kind for s in scene.shapes}) < count or len({s.color for s in scene.shapes}) < count:
            continue
        question, answer = colour_question(scene.shapes[rng.randrange(count)])
        items.append(EvalItem((render(scene),), (_user(question, 1),), question, answer, "color", (scene,)))
    return items


def corpus(seed: int, n: int) -> list[str]:
    """Question and answer texts for tokenizer training (every word the model will ever need)."""
    rng = random.Random(seed)
    texts: list[str] = []
    for _ in range(n):
        sample = sample_conversation(rng)
        for message in sample.messages:
            texts += [part["text"] for part in message["content"] if part["type"] == "text"]
    return texts
