"""Procedurally generated shape scenes with grammatical captions: the built-in default data.

No install, no download, deterministic by seed: sample ``i`` of seed ``s`` is the same image and
caption whatever ``n`` is, so tests and the tiny pipeline always see the same data. A scene holds
one or two groups of identical shapes; the caption names each group's count, size, colour, shape
and (with one group, or two on opposite halves) its position, e.g.

    "two small red circles on the left and a large blue square on the right"

which is what a contrastive model must learn to bind: attribute-object binding, counting and
spatial words, the failure modes CLIP-style models are known for.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator

from PIL import Image, ImageDraw

from mmafm.data import Pair, generated_key, generated_pairs

__all__ = [
    "SHAPES",
    "COLOURS",
    "SIZES",
    "POSITIONS",
    "Group",
    "Scene",
    "sample_scene",
    "describe",
    "render",
    "synthetic_pair",
    "generate_pairs",
]

SOURCE = "synthetic"
LICENSE = "CC0-1.0"

SHAPES = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "diamond": "diamonds"}
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (130, 40, 170),
    "orange": (245, 130, 20),
    "black": (20, 20, 20),
    "pink": (240, 120, 180),
}
SIZES = {"small": 0.07, "large": 0.13}  # radius as a fraction of the image side
# Region of the unit square each position word covers: (x0, y0, x1, y1).
POSITIONS = {
    "on the left": (0.0, 0.0, 0.5, 1.0),
    "on the right": (0.5, 0.0, 1.0, 1.0),
    "at the top": (0.0, 0.0, 1.0, 0.5),
    "at the bottom": (0.0, 0.5, 1.0, 1.0),
    "in the center": (0.25, 0.25, 0.75, 0.75),
}
OPPOSITE_PAIRS = (("on the left", "on the right"), ("at the top", "at the bottom"))
NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
TEMPLATES = ("{}", "a picture of {}", "an image with {}", "{} on a plain background")
BACKGROUNDS = ((255, 255, 255), (245, 245, 240), (235, 240, 250), (250, 245, 230))
SUPERSAMPLE = 4  # draw at 4x then downsample: anti-aliased edges without extra dependencies


@dataclass(frozen=True)
class Group:
    """``count`` identical shapes inside one region."""

    count: int
    size: str
    colour: str
    shape: str
    position: str
    centres: tuple[tuple[float, float], ...]  # unit coordinates of each shape's centre


@dataclass(frozen=True)
class Scene:
    groups: tuple[Group, ...]
    background: tuple[int, int, int]
    template: str


def _place(rng: random.Random, count: int, radius: float, region: tuple[float, ...]) -> tuple:
    """Centres of ``count`` shapes inside ``region``, avoiding overlap when there is room."""
    x0, y0, x1, y1 = region
    margin = radius * 1.05
    centres: list[tuple[float, float]] = []
    for _ in range(count):
        best, best_gap = None, -1.0
        for _attempt in range(30):
            point = (rng.uniform(x0 + margin, x1 - margin), rng.uniform(y0 + margin, y1 - margin))
            gap = min((math.dist(point, other) for other in centres), default=1.0)
            if gap > best_gap:
                best, best_gap = point, gap
            if gap >= 2.2 * radius:
                break
        centres.append(best)
    return tuple(centres)


def sample_scene(rng: random.Random) -> Scene:
    """Draw a random scene: one group anywhere, or two groups on opposite halves."""
    if rng.random() < 0.5:
        positions: tuple[str, ...] = (rng.choice(list(POSITIONS)),)
    else:
        positions = rng.choice(OPPOSITE_PAIRS)
    groups = []
    used: set[tuple[str, str]] = set()
    for position in positions:
        while True:  # two groups never share colour and shape, so the caption tells them apart
            colour, shape = rng.choice(list(COLOURS)), rng.choice(list(SHAPES))
            if (colour, shape) not in used:
                used.add((colour, shape))
                break
        size = rng.choice(list(SIZES))
        count = rng.randint(1, 3 if size == "large" else 4)
        centres = _place(rng, count, SIZES[size], POSITIONS[position])
        groups.append(Group(count, size, colour, shape, position, centres))
    return Scene(tuple(groups), rng.choice(BACKGROUNDS), rng.choice(TEMPLATES))


def describe(scene: Scene) -> str:
    """The caption of ``scene`` from its grammar: ``NUM SIZE COLOUR SHAPE[s] POSITION [and ...]``."""
    phrases = []
    for group in scene.groups:
        noun = group.shape if group.count == 1 else SHAPES[group.shape]
        phrases.append(f"{NUMBER_WORDS[group.count]} {group.size} {group.colour} {noun} {group.position}")
    return scene.template.format(" and ".join(phrases))


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        angles = [-90, 30, 150]
        return [(cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a in angles]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.45 * r
            angle = math.radians(-90 + 36 * k)
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"no polygon for shape {shape!r}; expected triangle, diamond or star")


def render(scene: Scene, image_size: int) -> Image.Image:
    """Draw ``scene`` as an RGB ``image_size`` x ``image_size`` image."""
    side = image_size * SUPERSAMPLE
    image = Image.new("RGB", (side, side), scene.background)
    draw = ImageDraw.Draw(image)
    for group in scene.groups:
        colour = COLOURS[group.colour]
        radius = SIZES[group.size] * side
        for ux, uy in group.centres:
            cx, cy = ux * side, uy * side
            if group.shape == "circle":
                draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
            elif group.shape == "square":
                half = radius * 0.85
                draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=colour)
            else:
                draw.polygon(_polygon(group.shape, cx, cy, radius), fill=colour)
    return image.resize((image_size, image_size), Image.Resampling.BOX)


def synthetic_pair(index: int, seed: int, image_size: int) -> Pair:
    """Sample ``index`` of the synthetic set for ``seed`` (independent of how many are drawn)."""
    rng = random.Random(f"mmafm-synthetic-{seed}-{index}")
    scene = sample_scene(rng)
    key, item_id = generated_key(SOURCE, seed, index)
    return Pair(key, render(scene, image_size), describe(scene), SOURCE, LICENSE, item_id)


def generate_pairs(n: int, seed: int = 0, image_size: int = 64) -> Iterator[Pair]:
    """Yield ``n`` synthetic pairs, deterministic by ``seed``."""
    return generated_pairs(synthetic_pair, "synthetic", n, seed, image_size)
