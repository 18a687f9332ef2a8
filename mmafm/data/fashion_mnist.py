"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``: held out for zero-shot eval.

Never trained on: the CLIP stages classify its test split zero-shot by comparing each image's
embedding with the embeddings of prompts built from :data:`CLASS_NAMES`. The files are the
original gzipped IDX files (Xiao et al. 2017, MIT licence) under
``/usr/share/datasets/fashion-mnist/``.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from mmafm.data import require_path

__all__ = ["DATA_DIR", "CLASS_NAMES", "load", "read_idx"]

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
PACKAGE = "dataset-fashion-mnist"
LICENSE = "MIT"
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: str | Path) -> np.ndarray:
    """Read a (gzipped) IDX file: magic ``0x0000 <dtype> <ndim>``, big-endian int32 dims, data.

    Raises:
        ValueError: the file is not an unsigned-byte IDX file or its size does not match its
            header.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot read IDX file: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (expected magic 00 00 08 NDIM, got {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes), file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=header).reshape(shape)


def load(
    split: str = "test", limit: int | None = None, data_dir: str | Path = DATA_DIR
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Fashion-MNIST images and labels.

    Args:
        split: "train" (60,000) or "test" (10,000).
        limit: keep the first ``limit`` examples (None = all).
        data_dir: folder holding the four IDX files.

    Returns:
        (images uint8 (N, 28, 28), labels int64 (N,), class names (10)).
    """
    if split not in FILES:
        raise ValueError(f"Fashion-MNIST split must be one of {sorted(FILES)}, got {split!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    root = require_path(data_dir, PACKAGE)
    image_file, label_file = FILES[split]
    images = read_idx(require_path(root / image_file, PACKAGE))
    labels = read_idx(require_path(root / label_file, PACKAGE)).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not match")
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"{root}: label {labels.max()} outside the {len(CLASS_NAMES)} classes")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels, list(CLASS_NAMES)
