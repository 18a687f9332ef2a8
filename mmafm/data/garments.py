"""Procedurally drawn garment silhouettes with captions: built-in clothing pictures.

The tiny data stage's other image sources hold only a handful of clothes, so a contrastive model
trained on them cannot name the ten Fashion-MNIST classes that zero-shot evaluation asks for
(Radford et al. 2021, section 3.1.4; the reports evaluate the image encoder zero-shot). This
source draws those ten concepts -- t-shirt/top, trousers, pullover, dress, coat, sandal, shirt,
sneaker, bag, ankle boot -- as flat, centred PIL silhouettes from parametric shapes (random
proportions, sleeve lengths, colours, stripe / check / dot fills, small rotations, scale and
position jitter) and captions them from a small grammar with synonyms, e.g.

    "a red striped t-shirt", "a pair of dark blue trousers", "a drawing of a green handbag"

Nothing here was designed or fitted on Fashion-MNIST images (they are the held-out test): the
shapes follow how garments are generally drawn (front views of clothes, side views of shoes).
Deterministic by seed like :mod:`mmafm.data.synthetic`: sample ``i`` of seed ``s`` is the same
pair whatever ``n`` is, and the classes cycle so any ``n >= 10`` draws every class.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Iterator

from PIL import Image, ImageDraw

from mmafm.data import Pair, generated_key, generated_pairs

__all__ = [
    "CLASSES",
    "NOUNS",
    "COLOURS",
    "PATTERNS",
    "Garment",
    "sample_garment",
    "describe",
    "render",
    "garment_pair",
    "generate_pairs",
]

SOURCE = "garments"
LICENSE = "CC0-1.0"
PACKAGE = "built in (mmafm.data.garments)"

# The ten concepts, in Fashion-MNIST's label order (mmafm.data.fashion_mnist.CLASS_NAMES).
CLASSES = ("tshirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
# Noun phrases per class (the caption picks one): singular phrases, "a"/"an" added by the grammar.
NOUNS = {
    "tshirt": ("t-shirt", "t shirt", "tee shirt", "top", "short sleeved top"),
    "trousers": ("pair of trousers", "pair of pants", "pair of jeans", "trousers", "pants"),
    "pullover": ("pullover", "sweater", "jumper", "knitted sweater"),
    "dress": ("dress", "summer dress", "sleeveless dress", "long dress"),
    "coat": ("coat", "jacket", "overcoat", "winter coat"),
    "sandal": ("sandal", "strappy sandal", "summer sandal", "open shoe"),
    "shirt": ("shirt", "button-up shirt", "collared shirt", "blouse"),
    "sneaker": ("sneaker", "running shoe", "trainer", "sports shoe"),
    "bag": ("bag", "handbag", "purse", "tote bag", "shoulder bag"),
    "ankle_boot": ("ankle boot", "boot", "short boot", "leather boot"),
}
PLURAL_NOUNS = {"trousers", "pants", "jeans"}  # "a pair of" is prefixed instead of "a"
COLOURS = {
    "black": (25, 25, 25),
    "grey": (120, 120, 120),
    "dark grey": (70, 70, 70),
    "white": (250, 250, 250),
    "red": (200, 35, 35),
    "dark red": (120, 20, 30),
    "pink": (235, 120, 170),
    "orange": (240, 130, 30),
    "yellow": (235, 200, 40),
    "beige": (215, 195, 150),
    "brown": (120, 75, 40),
    "green": (40, 150, 60),
    "dark green": (25, 80, 40),
    "blue": (40, 90, 210),
    "dark blue": (25, 35, 110),
    "light blue": (130, 175, 230),
    "purple": (120, 50, 160),
}
PATTERNS = ("plain", "striped", "checked", "spotted")
PATTERN_WEIGHTS = (0.55, 0.2, 0.13, 0.12)
PATTERN_WORDS = {"plain": ("",), "striped": ("striped",), "checked": ("checked", "plaid"), "spotted": ("spotted", "polka dot")}
TEMPLATES = ("{}", "{}", "a drawing of {}", "a picture of {}", "a photo of {}", "{} on a white background")
BACKGROUNDS = ((255, 255, 255), (250, 250, 250), (245, 245, 242), (240, 242, 246))
SUPERSAMPLE = 4  # draw at 4x then downsample (anti-aliased edges)
MAX_ROTATION = 8.0  # degrees either way
SHADING = 0.3  # largest brightness change of the light ramp across a garment
# Some pictures are low-resolution thumbnails upsampled to the image side (blurry edges, as small
# catalogue images are) [open]: probability and range of the drawn side as a fraction.
LOW_RESOLUTION_PROB = 0.35
LOW_RESOLUTION = (0.4, 0.75)


@dataclass(frozen=True)
class Garment:
    """Everything that decides one picture and its caption."""

    kind: str  # one of CLASSES
    colour: str  # key of COLOURS
    pattern: str  # one of PATTERNS
    scale: float  # object extent as a fraction of the image side
    centre: tuple[float, float]  # unit coordinates of the object's centre
    rotation: float  # degrees, counter-clockwise
    mirror: bool  # shoes and bags face the other way
    background: tuple[int, int, int]
    shape_seed: int  # seeds the per-class proportions (sleeve length, widths, ...)
    resolution: float  # drawn at this fraction of the image side, then upsampled (1.0 = sharp)
    noun: str
    pattern_word: str
    template: str


@dataclass
class _Drawing:
    """What a class drawer produces, in unit coordinates of the object box ([0, 1]^2)."""

    polygons: list[list[tuple[float, float]]] = field(default_factory=list)  # filled with the garment colour
    ellipses: list[tuple[float, float, float, float]] = field(default_factory=list)  # filled too
    bands: list[tuple[list[tuple[float, float]], float]] = field(default_factory=list)  # thick lines (width in units)
    accents: list[list[tuple[float, float]]] = field(default_factory=list)  # filled in a contrast colour (soles)
    lines: list[list[tuple[float, float]]] = field(default_factory=list)  # thin detail lines (seams, laces)
    dots: list[tuple[float, float]] = field(default_factory=list)  # buttons


def _mirror(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(1.0 - x, y) for x, y in points]


def _symmetric(right: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """A left-right symmetric outline from its right half (top to bottom)."""
    return right + _mirror(right)[::-1]


def _top(rng: random.Random, sleeve: str, length: float) -> tuple[_Drawing, float, float]:
    """A front-view upper garment: neck, shoulders, sleeves (short / long) and body.

    Returns the drawing, the neck's half width and the body's half width.
    """
    half = rng.uniform(0.2, 0.27)  # half width of the body
    neck = rng.uniform(0.07, 0.1)
    top = 0.5 - length / 2
    bottom = 0.5 + length / 2
    shoulder = (0.5 + half + 0.02, top + 0.04)
    if sleeve == "short":
        angle, span, width, armpit = math.radians(rng.uniform(25, 40)), rng.uniform(0.14, 0.2), rng.uniform(0.12, 0.16), 0.2
    else:
        angle, span, width, armpit = math.radians(rng.uniform(62, 76)), length * rng.uniform(0.62, 0.78), rng.uniform(0.1, 0.13), 0.2
    direction = (math.cos(angle), math.sin(angle))
    inward = (-math.sin(angle), math.cos(angle))
    cuff_out = (shoulder[0] + span * direction[0], shoulder[1] + span * direction[1])
    cuff_in = (cuff_out[0] + width * inward[0], cuff_out[1] + width * inward[1])
    flare = rng.uniform(-0.02, 0.03)
    right = [(0.5 + neck, top), shoulder, cuff_out, cuff_in, (0.5 + half, top + armpit), (0.5 + half + flare, bottom)]
    outline = [(0.5, top + rng.uniform(0.04, 0.08))] + _symmetric(right)
    drawing = _Drawing(polygons=[outline])
    drawing.lines.append([cuff_out, cuff_in])
    drawing.lines.append([_mirror([cuff_out])[0], _mirror([cuff_in])[0]])
    return drawing, neck, half + flare


def _tshirt(rng: random.Random) -> _Drawing:
    drawing, neck, _ = _top(rng, "short", rng.uniform(0.72, 0.88))
    top = drawing.polygons[0][1][1]
    drawing.lines.append([(0.5 - neck, top), (0.5, top + 0.07), (0.5 + neck, top)])
    return drawing


def _pullover(rng: random.Random) -> _Drawing:
    length = rng.uniform(0.75, 0.9)
    drawing, neck, half = _top(rng, "long", length)
    bottom = 0.5 + length / 2
    band = rng.uniform(0.05, 0.08)  # ribbed hem band
    drawing.lines.append([(0.5 - half, bottom - band), (0.5 + half, bottom - band)])
    for k in range(1, 6):  # ribs
        x = 0.5 - half + 2 * half * k / 6
        drawing.lines.append([(x, bottom - band), (x, bottom)])
    top = 0.5 - length / 2
    drawing.lines.append([(0.5 - neck, top), (0.5, top + 0.06), (0.5 + neck, top)])
    return drawing


def _shirt(rng: random.Random) -> _Drawing:
    length = rng.uniform(0.78, 0.92)
    drawing, neck, _ = _top(rng, "long" if rng.random() < 0.8 else "short", length)
    top = 0.5 - length / 2
    collar = rng.uniform(0.08, 0.12)
    for side in (-1, 1):  # the collar's two points
        drawing.lines.append([(0.5 + side * neck, top), (0.5 + side * 0.02, top + collar), (0.5, top + 0.03)])
    drawing.lines.append([(0.5, top + collar), (0.5, 0.5 + length / 2)])  # button placket
    drawing.dots.extend((0.5 + 0.015, top + collar + k * (length - collar) / 6) for k in range(1, 6))
    if rng.random() < 0.5:  # chest pocket
        x0 = 0.5 + rng.uniform(0.06, 0.09)
        y0 = top + collar + 0.05
        drawing.lines.append([(x0, y0), (x0 + 0.09, y0), (x0 + 0.09, y0 + 0.1), (x0, y0 + 0.1), (x0, y0)])
    return drawing


def _coat(rng: random.Random) -> _Drawing:
    length = rng.uniform(0.86, 0.96)
    drawing, neck, half = _top(rng, "long", length)
    top, bottom = 0.5 - length / 2, 0.5 + length / 2
    lapel = rng.uniform(0.16, 0.26)
    for side in (-1, 1):  # lapels / open collar
        drawing.lines.append([(0.5 + side * neck, top), (0.5 + side * (neck + 0.06), top + lapel * 0.5), (0.5, top + lapel)])
    drawing.lines.append([(0.5, top + lapel), (0.5, bottom)])  # the front opening
    drawing.dots.extend((0.5 - 0.04, top + lapel + k * 0.12) for k in range(1, 4))
    if rng.random() < 0.6:  # belt
        y = 0.5 + rng.uniform(0.0, 0.08)
        drawing.lines.append([(0.5 - half, y), (0.5 + half, y)])
    return drawing


def _dress(rng: random.Random) -> _Drawing:
    length = rng.uniform(0.82, 0.96)
    top, bottom = 0.5 - length / 2, 0.5 + length / 2
    chest = rng.uniform(0.11, 0.16)
    waist_y = top + length * rng.uniform(0.3, 0.42)
    waist = chest * rng.uniform(0.75, 0.95)
    hem = rng.uniform(0.24, 0.4)
    strap = rng.uniform(0.03, 0.06)
    right = [(0.5 + 0.04, top + 0.06), (0.5 + chest - strap, top), (0.5 + chest, top)]
    if rng.random() < 0.35:  # cap sleeves
        right += [(0.5 + chest + 0.07, top + 0.06), (0.5 + chest + 0.03, top + 0.12)]
    right += [(0.5 + chest, top + 0.14), (0.5 + waist, waist_y), (0.5 + hem, bottom)]
    outline = _symmetric(right)
    drawing = _Drawing(polygons=[outline])
    drawing.lines.append([(0.5 - waist, waist_y), (0.5 + waist, waist_y)])
    return drawing


def _trousers(rng: random.Random) -> _Drawing:
    length = rng.uniform(0.85, 0.96)
    top, bottom = 0.5 - length / 2, 0.5 + length / 2
    waist = rng.uniform(0.16, 0.22)
    flare = rng.uniform(-0.03, 0.06)
    gap = rng.uniform(0.04, 0.09)  # half the space between the legs at the hem
    crotch = top + length * rng.uniform(0.28, 0.36)
    outer = 0.5 + waist + flare
    leg = outer - 0.5 - gap  # width of each leg at the hem
    right = [(0.5 + waist, top), (0.5 + waist + 0.02, top + 0.12), (outer, bottom), (outer - leg, bottom), (0.5, crotch)]
    outline = right + _mirror(right[:-1])[::-1]
    drawing = _Drawing(polygons=[outline])
    band = 0.05
    drawing.lines.append([(0.5 - waist, top + band), (0.5 + waist, top + band)])
    drawing.lines.append([(0.5, top + band), (0.5, crotch - 0.04)])  # fly
    return drawing


def _shoe_sole(rng: random.Random, x0: float, x1: float, ground: float, thickness: float) -> list[tuple[float, float]]:
    return [(x0, ground - thickness), (x1, ground - thickness), (x1 + 0.01, ground - thickness / 2), (x1 - 0.02, ground), (x0 + 0.01, ground)]


def _sneaker(rng: random.Random) -> _Drawing:
    length = rng.uniform(0.8, 0.94)
    x0, x1 = 0.5 - length / 2, 0.5 + length / 2  # heel at x0, toe at x1
    height = length * rng.uniform(0.42, 0.55)
    ground = 0.5 + height / 2
    sole = rng.uniform(0.06, 0.1)
    base = ground - sole
    upper = [
        (x0 + 0.01, base), (x1, base), (x1 + 0.01, base - 0.06), (x1 - 0.04, base - height * 0.35),
        (x1 - length * 0.3, base - height * 0.6), (x0 + length * 0.4, base - height * 0.95),
        (x0 + length * 0.2, base - height * 0.85), (x0 + length * 0.06, base - height * 0.95), (x0, base - height * 0.6),
    ]
    drawing = _Drawing(polygons=[upper], accents=[_shoe_sole(rng, x0, x1, ground, sole)])
    for k in range(4):  # laces
        t = 0.15 + 0.2 * k
        ax, ay = x0 + length * (0.38 + 0.32 * t), base - height * (0.85 - 0.3 * t)
        drawing.lines.append([(ax - 0.04, ay - 0.01), (ax + 0.04, ay + 0.02)])
    if rng.random() < 0.6:  # side stripe
        drawing.lines.append([(x0 + length * 0.3, base - 0.02), (x0 + length * 0.55, base - height * 0.5)])
    return drawing


def _ankle_boot(rng: random.Random) -> _Drawing:
    length = rng.uniform(0.72, 0.88)
    x0, x1 = 0.5 - length / 2, 0.5 + length / 2
    height = length * rng.uniform(0.8, 1.0)
    ground = 0.5 + min(height, 0.92) / 2
    sole = rng.uniform(0.04, 0.07)
    heel = rng.uniform(0.0, 0.12)  # heel height above the sole
    base = ground - sole
    shaft = length * rng.uniform(0.38, 0.5)
    upper = [
        (x0, base - heel), (x0 + shaft * 0.2, base - heel), (x0 + shaft * 0.6, base), (x1, base), (x1 - 0.02, base - 0.1),
        (x1 - length * 0.3, base - height * 0.4), (x0 + shaft, base - height * 0.55), (x0 + shaft, ground - height),
        (x0 + 0.02, ground - height), (x0, base - heel - 0.1),
    ]
    accents = [_shoe_sole(rng, x0 + shaft * 0.55, x1, ground, sole)]
    accents.append([(x0, base - heel), (x0 + shaft * 0.3, base - heel), (x0 + shaft * 0.35, ground), (x0 + 0.01, ground)])
    drawing = _Drawing(polygons=[upper], accents=accents)
    if rng.random() < 0.5:  # zip or elastic side panel
        drawing.lines.append([(x0 + shaft * 0.55, ground - height + 0.04), (x0 + shaft * 0.55, base - height * 0.3)])
    return drawing


def _sandal(rng: random.Random) -> _Drawing:
    length = rng.uniform(0.8, 0.94)
    x0, x1 = 0.5 - length / 2, 0.5 + length / 2
    heel = rng.uniform(0.0, 0.25) if rng.random() < 0.6 else 0.0
    ground = 0.5 + rng.uniform(0.15, 0.25)
    sole = rng.uniform(0.05, 0.08)
    # footbed: from the (raised) heel down to the toe
    bed = [(x0, ground - heel - sole), (x0 + length * 0.35, ground - heel * 0.6 - sole), (x0 + length * 0.6, ground - sole),
           (x1, ground - sole), (x1, ground), (x0 + length * 0.6, ground), (x0 + length * 0.35, ground - heel * 0.6), (x0, ground - heel)]
    drawing = _Drawing(polygons=[bed])
    if heel > 0.05:  # heel block
        drawing.polygons.append([(x0, ground - heel), (x0 + 0.08, ground - heel), (x0 + 0.07, ground), (x0 + 0.01, ground)])
    straps = rng.randint(2, 4)
    width = rng.uniform(0.04, 0.07)
    for k in range(straps):  # arcs over the foot
        u = 0.15 + 0.75 * k / max(straps - 1, 1)
        xs = x0 + length * u
        rise = rng.uniform(0.18, 0.3) * (1.1 - 0.5 * u)
        foot = ground - sole - heel * max(0.0, 1 - u / 0.6)
        drawing.bands.append(([(xs - 0.07, foot), (xs - 0.03, foot - rise), (xs + 0.03, foot - rise), (xs + 0.07, foot)], width))
    if heel > 0.05 or rng.random() < 0.5:  # ankle strap
        top = ground - heel - sole - rng.uniform(0.18, 0.28)
        drawing.bands.append(([(x0 + 0.02, ground - heel - sole), (x0 + 0.04, top), (x0 + length * 0.3, top + 0.03)], width))
    return drawing


def _bag(rng: random.Random) -> _Drawing:
    width = rng.uniform(0.55, 0.85)
    height = rng.uniform(0.4, 0.6)
    taper = rng.uniform(0.0, 0.1)
    bottom = 0.5 + (height + 0.25) / 2
    top = bottom - height
    body = [(0.5 - width / 2 + taper, top), (0.5 + width / 2 - taper, top), (0.5 + width / 2, bottom), (0.5 - width / 2, bottom)]
    drawing = _Drawing(polygons=[body])
    handle = rng.uniform(0.15, 0.3)
    strap = rng.uniform(0.03, 0.05)
    if rng.random() < 0.5:  # one arched handle
        span = width * rng.uniform(0.3, 0.5)
        drawing.bands.append(([(0.5 - span / 2, top), (0.5 - span / 2, top - handle * 0.8), (0.5 - span / 4, top - handle),
                               (0.5 + span / 4, top - handle), (0.5 + span / 2, top - handle * 0.8), (0.5 + span / 2, top)], strap))
    else:  # two straps from the corners
        a, b = 0.5 - width / 2 + taper + 0.05, 0.5 + width / 2 - taper - 0.05
        drawing.bands.append(([(a, top), (0.5 - 0.05, top - handle), (0.5 + 0.05, top - handle), (b, top)], strap))
    if rng.random() < 0.6:  # flap
        drawing.lines.append([(0.5 - width / 2 + taper, top), (0.5, top + height * 0.45), (0.5 + width / 2 - taper, top)])
        drawing.dots.append((0.5, top + height * 0.45))
    return drawing


DRAWERS: dict[str, Callable[[random.Random], _Drawing]] = {
    "tshirt": _tshirt, "trousers": _trousers, "pullover": _pullover, "dress": _dress, "coat": _coat,
    "sandal": _sandal, "shirt": _shirt, "sneaker": _sneaker, "bag": _bag, "ankle_boot": _ankle_boot,
}


def sample_garment(rng: random.Random, kind: str) -> Garment:
    """Draw the random attributes of one picture of class ``kind``."""
    if kind not in DRAWERS:
        raise ValueError(f"unknown garment class {kind!r}; expected one of {list(CLASSES)}")
    pattern = rng.choices(PATTERNS, PATTERN_WEIGHTS)[0]
    scale = rng.uniform(0.62, 0.98)
    jitter = (1.0 - scale) / 2
    centre = (0.5 + rng.uniform(-jitter, jitter), 0.5 + rng.uniform(-jitter, jitter))
    return Garment(
        kind=kind,
        colour=rng.choice(list(COLOURS)),
        pattern=pattern,
        scale=scale,
        centre=centre,
        rotation=rng.uniform(-MAX_ROTATION, MAX_ROTATION),
        mirror=rng.random() < 0.5,
        background=rng.choice(BACKGROUNDS),
        shape_seed=rng.getrandbits(32),
        resolution=rng.uniform(*LOW_RESOLUTION) if rng.random() < LOW_RESOLUTION_PROB else 1.0,
        noun=rng.choice(NOUNS[kind]),
        pattern_word=rng.choice(PATTERN_WORDS[pattern]),
        template=rng.choice(TEMPLATES),
    )


def _size_word(scale: float) -> str:
    return "small " if scale < 0.7 else ""


def describe(garment: Garment) -> str:
    """The caption: ``TEMPLATE(a|an|a pair of [small] COLOUR [PATTERN] NOUN)``."""
    words = f"{_size_word(garment.scale)}{garment.colour} " + (f"{garment.pattern_word} " if garment.pattern_word else "")
    noun = garment.noun
    if noun.startswith("pair of "):
        phrase = f"a pair of {words}{noun[len('pair of '):]}"
    elif noun in PLURAL_NOUNS:
        phrase = f"a pair of {words}{noun}"
    else:
        phrase = words + noun
        phrase = ("an " if phrase[0] in "aeiou" else "a ") + phrase
    return garment.template.format(phrase)


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    """Darker (factor < 1) or towards white (factor > 1) version of ``colour``."""
    if factor <= 1.0:
        return tuple(int(c * factor) for c in colour)
    t = min(factor - 1.0, 1.0)
    return tuple(int(c + (255 - c) * t) for c in colour)


def _fill(side: int, colour: tuple[int, int, int], pattern: str, rng: random.Random) -> Image.Image:
    """A ``side`` x ``side`` image of the garment's fabric."""
    fabric = Image.new("RGB", (side, side), colour)
    if pattern == "plain":
        return fabric
    second = _shade(colour, 1.6) if sum(colour) < 300 else _shade(colour, 0.45)
    draw = ImageDraw.Draw(fabric)
    period = int(side * rng.uniform(0.06, 0.1))
    width = max(1, int(period * rng.uniform(0.35, 0.5)))
    if pattern == "striped":
        vertical = rng.random() < 0.3
        for offset in range(0, side, period):
            box = (offset, 0, offset + width, side) if vertical else (0, offset, side, offset + width)
            draw.rectangle(box, fill=second)
    elif pattern == "checked":
        for offset in range(0, side, period):
            draw.rectangle((offset, 0, offset + width // 2, side), fill=second)
            draw.rectangle((0, offset, side, offset + width // 2), fill=second)
    else:  # spotted
        radius = max(1, width // 2)
        for row, y in enumerate(range(0, side, period)):
            for x in range(period // 2 * (row % 2), side, period):
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=second)
    return fabric


def _shaded(fabric: Image.Image, rng: random.Random) -> Image.Image:
    """Light falling across the fabric: brightness ramps linearly by up to +-SHADING."""
    side = fabric.width
    angle = rng.uniform(0.0, 2.0 * math.pi)
    strength = rng.uniform(0.0, SHADING)
    ramp = Image.linear_gradient("L").resize((side, side)).rotate(math.degrees(angle), expand=False, fillcolor=128)
    light = Image.merge("RGB", (ramp, ramp, ramp))
    dark = Image.blend(fabric, Image.new("RGB", fabric.size, (0, 0, 0)), strength)
    bright = Image.blend(fabric, Image.new("RGB", fabric.size, (255, 255, 255)), strength)
    return Image.composite(bright, dark, light.convert("L"))


def render(garment: Garment, image_size: int) -> Image.Image:
    """Draw ``garment`` as an RGB ``image_size`` x ``image_size`` picture."""
    rng = random.Random(garment.shape_seed)
    drawing = DRAWERS[garment.kind](rng)
    side = image_size * SUPERSAMPLE
    box = garment.scale * side
    left = garment.centre[0] * side - box / 2
    top = garment.centre[1] * side - box / 2

    def to_pixels(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        if garment.mirror and garment.kind in ("sandal", "sneaker", "ankle_boot", "bag"):
            points = _mirror(points)
        return [(left + x * box, top + y * box) for x, y in points]

    colour = COLOURS[garment.colour]
    mask = Image.new("L", (side, side), 0)
    draw_mask = ImageDraw.Draw(mask)
    for polygon in drawing.polygons:
        draw_mask.polygon(to_pixels(polygon), fill=255)
    for x0, y0, x1, y1 in drawing.ellipses:
        (a, b), (c, d) = to_pixels([(x0, y0), (x1, y1)])
        draw_mask.ellipse((min(a, c), min(b, d), max(a, c), max(b, d)), fill=255)
    for points, width in drawing.bands:
        draw_mask.line(to_pixels(points), fill=255, width=max(1, int(width * box)), joint="curve")
    image = Image.new("RGB", (side, side), garment.background)
    image.paste(_shaded(_fill(side, colour, garment.pattern, rng), rng), mask=mask)
    draw = ImageDraw.Draw(image)
    edge = _shade(colour, 0.5) if sum(colour) > 150 else _shade(colour, 2.0)
    accent = (235, 235, 230) if sum(colour) < 360 else (60, 60, 60)
    for polygon in drawing.accents:
        draw.polygon(to_pixels(polygon), fill=accent, outline=edge)
    line_width = max(1, int(0.012 * box))
    for points in drawing.lines:
        draw.line(to_pixels(points), fill=edge, width=line_width)
    dot = max(1, int(0.012 * box))
    for x, y in to_pixels(drawing.dots):
        draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=edge)
    if sum(colour) > 690:  # a white garment needs its outline to be seen on a white background
        for polygon in drawing.polygons:
            draw.polygon(to_pixels(polygon), outline=(150, 150, 150), width=line_width)
    if garment.rotation:
        image = image.rotate(garment.rotation, resample=Image.Resampling.BILINEAR, fillcolor=garment.background)
    if garment.resolution < 1.0:
        small = max(8, round(image_size * garment.resolution))
        image = image.resize((small, small), Image.Resampling.BOX)
        return image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return image.resize((image_size, image_size), Image.Resampling.BOX)


def garment_pair(index: int, seed: int, image_size: int) -> Pair:
    """Sample ``index`` of the garment set for ``seed`` (independent of how many are drawn).

    Classes cycle with the index, so every run of ten consecutive samples holds all ten.
    """
    rng = random.Random(f"mmafm-garments-{seed}-{index}")
    garment = sample_garment(rng, CLASSES[index % len(CLASSES)])
    key, item_id = generated_key(SOURCE, seed, index)
    return Pair(key, render(garment, image_size), describe(garment), SOURCE, LICENSE, item_id)


def generate_pairs(n: int, seed: int = 0, image_size: int = 64) -> Iterator[Pair]:
    """Yield ``n`` garment pairs, deterministic by ``seed``."""
    return generated_pairs(garment_pair, "garment", n, seed, image_size)
