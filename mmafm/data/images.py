"""Small image helpers shared by the sources and the shard reader."""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["to_rgb", "grey16_to_l", "fit_square"]

WHITE = (255, 255, 255)
# 16-bit greyscale (PNG bit depth 16 opens as "I;16"; older Pillow gave 32-bit "I" holding the
# same 0..65535 values): PIL's own convert clips each value to 255, so almost every pixel is white
GREY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def grey16_to_l(image: Image.Image) -> Image.Image:
    """A 16-bit greyscale image (:data:`GREY16_MODES`) as 8-bit "L": 0..65535 scaled to 0..255,
    rounded to nearest (``round(v * 255 / 65535)``, exact in integers; "I" values outside 0..65535
    are clipped to it)."""
    values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)  # (H, W)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency over ``background``.

    Clip art and stamps are mostly RGBA / LA / palette images with a transparent background; a
    plain ``convert("RGB")`` would turn the transparent area black (or random colours). 16-bit
    greyscale is scaled to 8 bits by :func:`grey16_to_l` (a plain convert clips it to white).
    """
    if image.mode == "RGB":
        return image
    if image.mode in GREY16_MODES:
        return grey16_to_l(image).convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def fit_square(image: Image.Image, size: int, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Letterbox ``image`` (RGB) onto a ``size`` x ``size`` canvas, keeping its aspect ratio."""
    width, height = image.size
    scale = size / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = image.resize((new_w, new_h), Image.Resampling.LANCZOS, reducing_gap=2.0)
    canvas = Image.new("RGB", (size, size), background)
    canvas.paste(resized, ((size - new_w) // 2, (size - new_h) // 2))
    return canvas
