"""Procedural image rendering for the testbed, with per-patch ground truth.

Every image is `IMAGE_SIZE` x `IMAGE_SIZE` pixels, read by the vision tower as a grid of `PATCH` x `PATCH`
patches. Each renderer also returns per-patch label grids (`GRID` x `GRID` ints, -100 where a task does not
apply), one per task in `AUX_TASKS`: what the patch shows (background / color x shape / letter), the patch holding
each object's centre, and facts about the object a patch belongs to (its 3 x 3 cell, how many objects of its
kind the image holds, the word a letter belongs to, a bar's value; and its color and its shape apart). The
labels feed a throwaway training-only classifier (see train.py) that stands in for vision pretraining: it teaches
the vision tower to put each fact on the patches of its object, where the language model can read it; they are
never part of the saved model.

Words and chart bars are drawn on patch-aligned cells (one letter per patch column, one value unit per patch
row): this is what makes OCR and chart reading learnable for a model trained from scratch on a CPU.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 128
PATCH = 16
GRID = IMAGE_SIZE // PATCH  # 8 x 8 = 64 image tokens

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 10),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ((255, 255, 255), (235, 235, 235), (245, 240, 225), (225, 235, 245))
# 3 x 3 placement grid, reading order.
POSITIONS = (
    "top left", "top center", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom center", "bottom right",
)
SIZES = {"small": 13, "large": 24}  # half-extent in pixels of an object in its 42-pixel cell
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
OCR_WORDS = (
    "cat", "dog", "sun", "moon", "tree", "fish", "bird", "star", "book", "lamp",
    "rain", "snow", "fire", "wind", "milk", "cake", "ship", "road", "frog", "bear",
    "lion", "wolf", "rose", "leaf", "door", "key", "cup", "hat", "box", "pen",
    "map", "egg", "bell", "coin", "drum", "kite", "ring", "sock", "vase", "yarn",
)
BLANK_GRAY = (128, 128, 128)
MAX_VALUE = GRID - 1  # chart bars hold 1..7 units
MAX_COUNT = 5

N_OBJECT_CLASSES = len(COLORS) * len(SHAPES)
N_PATCH_CLASSES = 1 + N_OBJECT_CLASSES + len(LETTERS)
# per-patch auxiliary task -> number of classes
AUX_TASKS: dict[str, int] = {
    "kind": N_PATCH_CLASSES,  # 0 background, color x shape, letter
    "center": N_PATCH_CLASSES,  # the object class on each object's centre patch, 0 elsewhere (scenes)
    "cell": len(POSITIONS),  # the 3 x 3 cell of the object on this patch (scenes)
    "count": MAX_COUNT + 1,  # how many objects of this patch's color and shape the scene holds
    "word": len(OCR_WORDS),  # the word this letter belongs to
    "value": MAX_VALUE + 1,  # the value of the bar on this patch
    "color": len(COLORS),  # the color of the object or bar on this patch (opt-in: train.TrainConfig.aux_tasks)
    "shape": len(SHAPES),  # the shape of the object on this patch (scenes; opt-in)
}


def object_class(color: str, shape: str) -> int:
    return 1 + list(COLORS).index(color) * len(SHAPES) + SHAPES.index(shape)


def letter_class(letter: str) -> int:
    return 1 + N_OBJECT_CLASSES + LETTERS.index(letter)


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    cell: int  # index into POSITIONS
    size: str = "large"

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass
class Rendered:
    image: Image.Image
    labels: dict[str, np.ndarray]  # AUX_TASKS name -> [GRID, GRID] int64, -100 where the task does not apply
    objects: tuple[Obj, ...] = ()  # what a scene shows
    bars: tuple[tuple[str, int], ...] = ()  # what a chart shows: (color, value) per bar

    def label_grid(self, task: str) -> np.ndarray:
        return self.labels.get(task, np.full((GRID, GRID), -100, dtype=np.int64))


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _patch_owners(id_map: Image.Image) -> np.ndarray:
    """Per patch, the majority non-zero id drawn in `id_map`; 0 unless it covers >= 4% of the patch."""
    arr = np.asarray(id_map, dtype=np.int64).reshape(GRID, PATCH, GRID, PATCH).transpose(0, 2, 1, 3)
    arr = arr.reshape(GRID, GRID, PATCH * PATCH)  # [GRID, GRID, pixels]
    out = np.zeros((GRID, GRID), dtype=np.int64)
    for r in range(GRID):
        for c in range(GRID):
            counts = np.bincount(arr[r, c], minlength=256)
            counts[0] = 0
            if counts.max() >= 0.04 * PATCH * PATCH:
                out[r, c] = int(counts.argmax())
    return out


def _labels(owners: np.ndarray, per_item: dict[str, list[int]], background: dict[str, int]) -> dict[str, np.ndarray]:
    """Label grids from patch owners (0 = none, i = item i - 1): task -> item values, `background` for owner 0."""
    out = {}
    for task, values in per_item.items():
        table = np.array([background.get(task, -100), *values], dtype=np.int64)
        out[task] = table[owners]
    return out


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(objects: list[Obj], rng: random.Random, background=None) -> Rendered:
    """Objects centred in their 3 x 3 cells with a little jitter."""
    background = background or rng.choice(BACKGROUNDS)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    ids = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw, idraw = ImageDraw.Draw(image), ImageDraw.Draw(ids)
    cell = IMAGE_SIZE / 3
    centers = np.zeros((GRID, GRID), dtype=np.int64)
    for i, obj in enumerate(objects):
        row, col = divmod(obj.cell, 3)
        r = SIZES[obj.size] * rng.uniform(0.85, 1.0)
        slack = max(0.0, cell / 2 - r - 1)
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        _draw_shape(draw, obj.shape, cx, cy, r, COLORS[obj.color])
        _draw_shape(idraw, obj.shape, cx, cy, r, i + 1)
        centers[min(GRID - 1, int(cy) // PATCH), min(GRID - 1, int(cx) // PATCH)] = object_class(obj.color, obj.shape)
    kinds = [(o.color, o.shape) for o in objects]
    labels = _labels(_patch_owners(ids), {
        "kind": [object_class(*k) for k in kinds],
        "cell": [o.cell for o in objects],
        "count": [min(MAX_COUNT, kinds.count(k)) for k in kinds],
        "color": [list(COLORS).index(o.color) for o in objects],
        "shape": [SHAPES.index(o.shape) for o in objects],
    }, {"kind": 0})
    return Rendered(image, {**labels, "center": centers}, objects=tuple(objects))


def render_word(word: str, rng: random.Random) -> Rendered:
    """Upper-case word, one letter centred in each patch column of one patch row."""
    text = word.upper()
    if len(text) > GRID:
        raise ValueError(f"word {word!r} longer than {GRID} letters")
    background = rng.choice(BACKGROUNDS)
    ink = rng.choice(((0, 0, 0), (30, 30, 120), (110, 20, 20)))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    ids = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw, idraw = ImageDraw.Draw(image), ImageDraw.Draw(ids)
    idraw.fontmode = "1"  # no anti-aliasing: id pixels must be exact
    font = _font(16)
    row = rng.randrange(1, GRID - 1)
    col0 = rng.randrange(0, GRID - len(text) + 1)
    for i, letter in enumerate(text):
        cx, cy = (col0 + i + 0.5) * PATCH, (row + 0.5) * PATCH
        draw.text((cx, cy), letter, fill=ink, font=font, anchor="mm")
        idraw.text((cx, cy), letter, fill=i + 1, font=font, anchor="mm")
    per_letter = {"kind": [letter_class(c) for c in text]}
    if word in OCR_WORDS:
        per_letter["word"] = [OCR_WORDS.index(word)] * len(text)
    return Rendered(image, _labels(_patch_owners(ids), per_letter, {"kind": 0}))


def render_chart(bars: list[tuple[str, int]], rng: random.Random) -> Rendered:
    """Bar chart: bar i fills patch column 1 + 2i, its value = filled patch rows above the axis (1-7)."""
    background = rng.choice(BACKGROUNDS)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    ids = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw, idraw = ImageDraw.Draw(image), ImageDraw.Draw(ids)
    base = IMAGE_SIZE - PATCH // 2  # axis in the middle of the last patch row
    draw.line([(2, base), (IMAGE_SIZE - 3, base)], fill=(0, 0, 0), width=2)
    for i, (color, value) in enumerate(bars):
        if not 1 <= value <= MAX_VALUE:
            raise ValueError(f"bar value {value} outside 1..{MAX_VALUE}")
        x0 = (1 + 2 * i) * PATCH + 1
        box = [x0, base - value * PATCH, x0 + PATCH - 3, base - 1]
        draw.rectangle(box, fill=COLORS[color])
        idraw.rectangle(box, fill=i + 1)
    labels = _labels(_patch_owners(ids), {"kind": [object_class(c, "square") for c, _ in bars],
                                          "value": [v for _, v in bars],
                                          "color": [list(COLORS).index(c) for c, _ in bars]}, {"kind": 0})
    return Rendered(image, labels, bars=tuple(bars))


def blank_image() -> Image.Image:
    """The blank-image control: uniform gray."""
    return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BLANK_GRAY)
