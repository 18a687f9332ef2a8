"""Real image-caption pairs from Debian packages (installed by ``make data``).

Each source is a generator ``<name>_pairs(image_size, limit, seed, stats)`` of :class:`Pair`:

- ``emoji``: the Noto Color Emoji font (``fonts-noto-color-emoji``) rendered glyph by glyph,
  named by the CLDR English annotations (``unicode-cldr-core``): the TTS name plus keywords.
  The font is a CBDT bitmap font with one strike, so FreeType loads it only at size 109.
- ``openclipart``: ``openclipart-png`` images captioned from the matching ``openclipart-svg``
  file's ``<dc:title>`` and ``<dc:subject>`` keywords. The 1,375 generated "gramastar" stars and
  the icon-theme collections (bare icons, titled by their collection, not their content) are
  dropped.
- ``tuxpaint``: ``tuxpaint-stamps-default`` PNG stamps; the first line of each stamp's ``.txt``
  is its English description.

``limit`` > 0 keeps a seeded random subset of that many usable items (the tiny pipeline);
``limit`` = 0 keeps all. What is dropped, and why, is counted in ``stats`` (a corrupt file is
skipped and counted, never fatal); a source that yields nothing raises
:class:`~mmafm.data.EmptySourceError`.
"""

from __future__ import annotations

import hashlib
import html
import random
import re
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from mmafm.data import EmptySourceError, Pair, SourceStats, require_path
from mmafm.data.images import fit_square, to_rgb

__all__ = [
    "ImageSource",
    "IMAGE_SOURCES",
    "emoji_pairs",
    "openclipart_pairs",
    "tuxpaint_pairs",
    "openclipart_caption",
    "pair_key",
]

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
CLDR_ANNOTATIONS = Path("/usr/share/unicode/cldr/common/annotations/en.xml")
EMOJI_FONT_SIZE = 109  # the font's only bitmap strike; any other size fails to load
OPENCLIPART_PNG = Path("/usr/share/openclipart/png")
OPENCLIPART_SVG = Path("/usr/share/openclipart/svg")
TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")

PACKAGES = {
    "emoji": "fonts-noto-color-emoji + unicode-cldr-core",
    "openclipart": "openclipart-png + openclipart-svg",
    "tuxpaint": "tuxpaint-stamps-default",
}
LICENSES = {
    "emoji": "OFL-1.1 (font) + Unicode-DFS-2016 (names)",
    "openclipart": "CC0-1.0 (public domain dedication)",
    "tuxpaint": "GPL-2.0",
}

# Errors that mean "this one file is broken": skipped and counted, never fatal.
CORRUPT_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)
# A few OpenClipArt PNGs are posters of up to 230 megapixels (2/3 of the package's pixels, and
# PIL's decompression-bomb limit); decoding them takes seconds each for a 64-pixel thumbnail.
MAX_PIXELS = 4_000_000


def pair_key(source: str, item_id: str) -> str:
    """A stable WebDataset key (no dots, which WebDataset reads as extension separators)."""
    return f"{source}-{hashlib.sha1(item_id.encode()).hexdigest()[:16]}"


def _seeded_order(items: list, limit: int, seed: int, source: str) -> list:
    """All items in a stable order; with a limit, a seeded shuffle so the subset is varied."""
    items = sorted(items)
    if limit > 0 and limit < len(items):
        random.Random(f"{source}-{seed}").shuffle(items)
    return items


def _load_image(path: Path, image_size: int, stats: SourceStats) -> Image.Image | None:
    """Open, flatten onto white and letterbox one image; None (counted) if corrupt or huge."""
    too_large = f"image over {MAX_PIXELS // 1_000_000} megapixels"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as raw:
                if raw.width * raw.height > MAX_PIXELS:
                    stats.skip(too_large)
                    return None
                return fit_square(to_rgb(raw), image_size)
    except Image.DecompressionBombError:
        stats.skip(too_large)
        return None
    except CORRUPT_ERRORS:
        stats.corrupt += 1
        return None


def _finish(stats: SourceStats, where: Path) -> None:
    if stats.kept == 0:
        raise EmptySourceError(
            f"data source {stats.source!r} produced no pairs from {where} "
            f"(skipped: {stats.skipped}, corrupt: {stats.corrupt})"
        )


# --------------------------------------------------------------------------------------- emoji
def _is_emoji(sequence: str) -> bool:
    """CLDR also annotates ASCII punctuation and symbols; keep pictographic sequences only."""
    return any(ord(char) >= 0x1F000 or 0x2190 <= ord(char) <= 0x2BFF or ord(char) == 0x20E3 for char in sequence)


def read_cldr_annotations(path: Path = CLDR_ANNOTATIONS) -> dict[str, tuple[str, list[str]]]:
    """Map each annotated sequence to (TTS name, keywords) from a CLDR annotations file."""
    root = ET.parse(path).getroot()
    names: dict[str, str] = {}
    keywords: dict[str, list[str]] = {}
    for node in root.iter("annotation"):
        sequence, text = node.get("cp"), (node.text or "").strip()
        if not sequence or not text:
            continue
        if node.get("type") == "tts":
            names[sequence] = text
        else:
            keywords[sequence] = [word.strip() for word in text.split("|") if word.strip()]
    return {seq: (name, keywords.get(seq, [])) for seq, name in names.items()}


def render_emoji(font: ImageFont.FreeTypeFont, sequence: str) -> Image.Image | None:
    """The glyph(s) of ``sequence`` cropped to their ink, RGBA; None if the font has no glyph."""
    canvas = Image.new("RGBA", (EMOJI_FONT_SIZE * 3, EMOJI_FONT_SIZE * 2), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((8, 8), sequence, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    return None if box is None else canvas.crop(box)


def emoji_caption(name: str, keywords: list[str]) -> str:
    extra = [word for word in keywords if word.lower() != name.lower()][:4]
    return f"emoji of {name}" + (f": {', '.join(extra)}" if extra else "")


def emoji_pairs(image_size: int, limit: int = 0, seed: int = 0, stats: SourceStats | None = None) -> Iterator[Pair]:
    """Emoji glyphs rendered from Noto Color Emoji, captioned by CLDR English annotations."""
    stats = stats or SourceStats("emoji", PACKAGES["emoji"], LICENSES["emoji"])
    font_path = require_path(EMOJI_FONT, "fonts-noto-color-emoji")
    annotations = read_cldr_annotations(require_path(CLDR_ANNOTATIONS, "unicode-cldr-core"))
    try:
        font = ImageFont.truetype(str(font_path), EMOJI_FONT_SIZE)
    except OSError as err:
        raise OSError(f"cannot load {font_path} at size {EMOJI_FONT_SIZE}: {err}") from err
    for sequence in _seeded_order(list(annotations), limit, seed, "emoji"):
        if limit and stats.kept >= limit:
            break
        if not _is_emoji(sequence):
            stats.skip("not an emoji (ASCII/symbol annotation)")
            continue
        glyph = render_emoji(font, sequence)
        if glyph is None:
            stats.skip("no glyph in the font")
            continue
        name, keywords = annotations[sequence]
        item_id = "U+" + "-".join(f"{ord(char):04X}" for char in sequence)
        stats.kept += 1
        image = fit_square(to_rgb(glyph), image_size)
        yield Pair(pair_key("emoji", item_id), image, emoji_caption(name, keywords), "emoji", LICENSES["emoji"], item_id)
    _finish(stats, CLDR_ANNOTATIONS)


# --------------------------------------------------------------------------------- openclipart
_WORK = re.compile(r"<cc:Work\b.*?</cc:Work>", re.S)
_TITLE = re.compile(r"<dc:title>(.*?)</dc:title>", re.S)
_SUBJECT = re.compile(r"<dc:subject>(.*?)</dc:subject>", re.S)
_LI = re.compile(r"<rdf:li>(.*?)</rdf:li>", re.S)
_CREATOR = re.compile(r"<dc:creator>.*?<dc:title>(.*?)</dc:title>", re.S)
# Titles naming a collection rather than the picture; a caption falls back to the keywords.
_GENERIC_TITLE = re.compile(r"^(various cliparts|aiga_symbol_signs|untitled|svg gradient collection.*|card)$", re.I)
_ICON_TITLE = re.compile(r"\bicons?\b|iconset|icon[- ]theme|svg theme|-theme\b", re.I)
_NOISE_KEYWORDS = {
    "", "hash", "unsorted", "mapsym", "special", "externalsource", "media", "clip art", "clipart",
    "image", "png", "svg", "public domain", "icon", "icons", "menu", "webpage",
}


def _clean(text: str) -> str:
    return " ".join(html.unescape(text).split())


def openclipart_caption(svg_text: str) -> tuple[str, str] | tuple[None, str]:
    """Caption from an OpenClipArt SVG's metadata: ``"<title>: kw1, kw2, ..."``.

    Returns:
        (caption, "") or (None, reason) when the file must be dropped (generated stars, icons,
        no usable text).
    """
    work = _WORK.search(svg_text)
    block = work.group(0) if work else svg_text
    title_match = _TITLE.search(block)
    title = _clean(title_match.group(1)) if title_match else ""
    if title.lower() == "gramastar":
        return None, "generated gramastar star"
    if _ICON_TITLE.search(title):
        return None, "icon collection"
    title = re.sub(r"^clipart by nicu buculei - ", "", title, flags=re.I)
    if "_" in title or re.fullmatch(r"[A-Za-z]+\d+", title):  # file-name-like: "jigsaw_red_10", "smiley111"
        title = re.sub(r"[_\d\s]+$", "", title).replace("_", " ").strip()
    creator_match = _CREATOR.search(block)
    creator = _clean(creator_match.group(1)).lower() if creator_match else ""
    if (
        _GENERIC_TITLE.match(title)
        or "@" in title
        or title.lower().startswith(("http:", "https:"))
        or (creator and title.lower() == creator)
    ):
        title = ""  # a collection name, or the uploader's name or address, says nothing about the picture
    subject = _SUBJECT.search(block)
    keywords: list[str] = []
    for raw in _LI.findall(subject.group(1)) if subject else []:
        word = _clean(raw).replace("_", " ")
        if word.lower() not in _NOISE_KEYWORDS | {title.lower(), creator} and word not in keywords:
            keywords.append(word)
    if not title and not keywords:
        return None, "no title or keywords"
    if not title:
        return ", ".join(keywords[:6]), ""
    return title + (f": {', '.join(keywords[:6])}" if keywords else ""), ""


def openclipart_pairs(image_size: int, limit: int = 0, seed: int = 0, stats: SourceStats | None = None) -> Iterator[Pair]:
    """OpenClipArt PNGs captioned from their SVG twin's title and keywords."""
    stats = stats or SourceStats("openclipart", PACKAGES["openclipart"], LICENSES["openclipart"])
    png_root = require_path(OPENCLIPART_PNG, "openclipart-png")
    svg_root = require_path(OPENCLIPART_SVG, "openclipart-svg")
    png_files = [path.relative_to(png_root).as_posix() for path in png_root.rglob("*.png")]
    for rel in _seeded_order(png_files, limit, seed, "openclipart"):
        if limit and stats.kept >= limit:
            break
        if "/icons/" in f"/{rel}":
            stats.skip("icon collection")
            continue
        svg_path = svg_root / Path(rel).with_suffix(".svg")
        try:
            svg_text = svg_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            stats.skip("no matching svg")
            continue
        except OSError:
            stats.corrupt += 1
            continue
        caption, reason = openclipart_caption(svg_text)
        if caption is None:
            stats.skip(reason)
            continue
        image = _load_image(png_root / rel, image_size, stats)
        if image is None:
            continue
        stats.kept += 1
        yield Pair(pair_key("openclipart", rel), image, caption, "openclipart", LICENSES["openclipart"], rel)
    _finish(stats, png_root)


# ------------------------------------------------------------------------------------ tuxpaint
def tuxpaint_pairs(image_size: int, limit: int = 0, seed: int = 0, stats: SourceStats | None = None) -> Iterator[Pair]:
    """Tux Paint stamps: PNG image + first line of the stamp's ``.txt`` description."""
    stats = stats or SourceStats("tuxpaint", PACKAGES["tuxpaint"], LICENSES["tuxpaint"])
    root = require_path(TUXPAINT_STAMPS, "tuxpaint-stamps-default")
    texts = [path.relative_to(root).as_posix() for path in root.rglob("*.txt")]
    for rel in _seeded_order(texts, limit, seed, "tuxpaint"):
        if limit and stats.kept >= limit:
            break
        png = (root / rel).with_suffix(".png")
        if not png.exists():
            stats.skip("svg-only stamp" if png.with_suffix(".svg").exists() else "no image")
            continue
        try:
            lines = (root / rel).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            stats.corrupt += 1
            continue
        caption = " ".join(lines[0].split()) if lines else ""
        if not caption:
            stats.skip("empty description")
            continue
        image = _load_image(png, image_size, stats)
        if image is None:
            continue
        stats.kept += 1
        yield Pair(pair_key("tuxpaint", rel), image, caption, "tuxpaint", LICENSES["tuxpaint"], rel)
    _finish(stats, root)


@dataclass(frozen=True)
class ImageSource:
    """A real image source: its generator and what its data card says about it."""

    name: str
    package: str
    license: str
    pairs: Callable[..., Iterator[Pair]]


IMAGE_SOURCES = {
    name: ImageSource(name, PACKAGES[name], LICENSES[name], pairs)
    for name, pairs in (("emoji", emoji_pairs), ("openclipart", openclipart_pairs), ("tuxpaint", tuxpaint_pairs))
}
