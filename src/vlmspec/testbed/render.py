"""Procedural image rendering for the testbed, with per-patch ground truth.

Every image is `IMAGE_SIZE` x `IMAGE_SIZE` pixels, read by the vision tower as a grid of `PATCH` x `PATCH`
patches. Each renderer also returns a per-patch label grid (`GRID` x `GRID` ints): 0 background, then one class
per color x shape, then one per letter; scenes also mark the patch holding each object's centre (for counting). The labels feed a throwaway training-only classifier (see train.py) that
stands in for vision pretraining; they are never part of the saved model.

Words and chart bars are drawn on patch-aligned cells (one letter per patch column, one value unit per patch
row): this is what makes OCR and chart reading learnable for a model trained from scratch in an hour on a CPU.
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
BLANK_GRAY = (128, 128, 128)

N_OBJECT_CLASSES = len(COLORS) * len(SHAPES)
N_PATCH_CLASSES = 1 + N_OBJECT_CLASSES + len(LETTERS)


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
    patch_labels: np.ndarray  # [GRID, GRID] int64
    center_labels: np.ndarray | None = None  # [GRID, GRID] int64: object class at each object's centre patch


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _patch_labels(label_map: Image.Image) -> np.ndarray:
    """Majority non-background label per patch; background unless it covers >= 4% of the patch."""
    arr = np.asarray(label_map, dtype=np.int64).reshape(GRID, PATCH, GRID, PATCH).transpose(0, 2, 1, 3)
    arr = arr.reshape(GRID, GRID, PATCH * PATCH)  # [GRID, GRID, pixels]
    out = np.zeros((GRID, GRID), dtype=np.int64)
    for r in range(GRID):
        for c in range(GRID):
            counts = np.bincount(arr[r, c], minlength=N_PATCH_CLASSES)
            counts[0] = 0
            if counts.max() >= 0.04 * PATCH * PATCH:
                out[r, c] = int(counts.argmax())
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
    labels = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw, ldraw = ImageDraw.Draw(image), ImageDraw.Draw(labels)
    cell = IMAGE_SIZE / 3
    centers = np.zeros((GRID, GRID), dtype=np.int64)
    for obj in objects:
        row, col = divmod(obj.cell, 3)
        r = SIZES[obj.size] * rng.uniform(0.85, 1.0)
        slack = max(0.0, cell / 2 - r - 1)
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        _draw_shape(draw, obj.shape, cx, cy, r, COLORS[obj.color])
        _draw_shape(ldraw, obj.shape, cx, cy, r, object_class(obj.color, obj.shape))
        centers[min(GRID - 1, int(cy) // PATCH), min(GRID - 1, int(cx) // PATCH)] = object_class(obj.color, obj.shape)
    return Rendered(image, _patch_labels(labels), centers)


def render_word(word: str, rng: random.Random) -> Rendered:
    """Upper-case word, one letter centred in each patch column of one patch row."""
    text = word.upper()
    if len(text) > GRID:
        raise ValueError(f"word {word!r} longer than {GRID} letters")
    background = rng.choice(BACKGROUNDS)
    ink = rng.choice(((0, 0, 0), (30, 30, 120), (110, 20, 20)))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    labels = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw, ldraw = ImageDraw.Draw(image), ImageDraw.Draw(labels)
    ldraw.fontmode = "1"  # no anti-aliasing: label pixels must be exact class ids
    font = _font(16)
    row = rng.randrange(1, GRID - 1)
    col0 = rng.randrange(0, GRID - len(text) + 1)
    for i, letter in enumerate(text):
        cx, cy = (col0 + i + 0.5) * PATCH, (row + 0.5) * PATCH
        draw.text((cx, cy), letter, fill=ink, font=font, anchor="mm")
        ldraw.text((cx, cy), letter, fill=letter_class(letter), font=font, anchor="mm")
    return Rendered(image, _patch_labels(labels))


def render_chart(bars: list[tuple[str, int]], rng: random.Random) -> Rendered:
    """Bar chart: bar i fills patch column 1 + 2i, its value = filled patch rows above the axis (1-7)."""
    background = rng.choice(BACKGROUNDS)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    labels = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw, ldraw = ImageDraw.Draw(image), ImageDraw.Draw(labels)
    base = IMAGE_SIZE - PATCH // 2  # axis in the middle of the last patch row
    draw.line([(2, base), (IMAGE_SIZE - 3, base)], fill=(0, 0, 0), width=2)
    for i, (color, value) in enumerate(bars):
        if not 1 <= value <= GRID - 1:
            raise ValueError(f"bar value {value} outside 1..{GRID - 1}")
        x0 = (1 + 2 * i) * PATCH + 1
        box = [x0, base - value * PATCH, x0 + PATCH - 3, base - 1]
        draw.rectangle(box, fill=COLORS[color])
        ldraw.rectangle(box, fill=object_class(color, "square"))
    return Rendered(image, _patch_labels(labels))


def blank_image() -> Image.Image:
    """The blank-image control: uniform gray."""
    return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BLANK_GRAY)
