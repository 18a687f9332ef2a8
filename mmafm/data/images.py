"""Small image helpers shared by the sources and the shard reader."""

from __future__ import annotations

from PIL import Image

__all__ = ["to_rgb", "fit_square"]

WHITE = (255, 255, 255)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency over ``background``.

    Clip art and stamps are mostly RGBA / LA / palette images with a transparent background; a
    plain ``convert("RGB")`` would turn the transparent area black (or random colours).
    """
    if image.mode == "RGB":
        return image
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
