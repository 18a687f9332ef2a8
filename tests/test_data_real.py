"""Real data sources from the Debian packages (`make data`) and the PyPI wiki package.

Marked ``realdata``; they run in CI (``make test`` installs the packages first). A missing
package FAILS these tests with a message naming ``make data``: it never skips them.
"""

import subprocess
from pathlib import Path

import numpy as np
import papermill
import pytest

from mmafm.data import SourceStats
from mmafm.data import fashion_mnist
from mmafm.data.sources import CLDR_ANNOTATIONS, IMAGE_SOURCES, TUXPAINT_STAMPS, emoji_caption, read_cldr_annotations
from mmafm.data.text_sources import TEXT_SOURCES
from mmafm.stages.base import read_manifest
from mmafm.stages.data import DataStageConfig

pytestmark = pytest.mark.realdata

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [
    "fonts-noto-color-emoji", "unicode-cldr-core", "openclipart-png", "openclipart-svg",
    "tuxpaint-stamps-default", "dataset-fashion-mnist", "wordnet-base", "fortunes", "jargon-text",
]


@pytest.fixture(scope="module", autouse=True)
def _packages_installed():
    missing = [p for p in PACKAGES if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if missing:
        pytest.fail(f"Debian data packages not installed: {missing}; run `make data` "
                    "(scripts/install_data_packages.sh)", pytrace=False)


@pytest.mark.parametrize("name", sorted(IMAGE_SOURCES))
def test_image_source_gives_captioned_pairs(name):
    stats = SourceStats(name, "", "")
    pairs = list(IMAGE_SOURCES[name].pairs(32, limit=40, seed=0, stats=stats))
    assert len(pairs) == 40 == stats.kept
    assert len({p.key for p in pairs}) == 40
    for pair in pairs:
        assert pair.caption.strip() and pair.source == name and pair.license
        assert pair.image.mode == "RGB" and pair.image.size == (32, 32)
        assert np.asarray(pair.image).std() > 1.0, f"blank image {pair.id}"
    again = [p.key for p in IMAGE_SOURCES[name].pairs(32, limit=40, seed=0)]
    assert again == [p.key for p in pairs]  # seeded subset


def test_emoji_named_by_cldr():
    annotations = read_cldr_annotations(CLDR_ANNOTATIONS)
    assert annotations["😀"][0] == "grinning face"
    pairs = {p.id: p for p in IMAGE_SOURCES["emoji"].pairs(32, limit=0)}
    assert len(pairs) > 1500
    grinning = pairs["U+1F600"]
    assert grinning.caption == emoji_caption(*annotations["😀"]) and grinning.caption.startswith("emoji of grinning face")
    red, green, blue = np.asarray(grinning.image).reshape(-1, 3).mean(0)
    assert red > blue + 30 and green > blue + 10, "the grinning face is yellow"
    assert "U+007B" not in pairs  # "{" is annotated by CLDR but is no emoji


def test_openclipart_drops_generated_stars_and_icons():
    stats = SourceStats("openclipart", "", "")
    pairs = list(IMAGE_SOURCES["openclipart"].pairs(16, limit=400, stats=stats))  # the whole set takes ~1 min
    assert len(pairs) == 400
    assert not any("gramastar" in p.caption.lower() for p in pairs)
    assert not any("/icons/" in f"/{p.id}" for p in pairs)
    # ~17% of the PNGs are gramastar stars and ~23% icon-theme icons: ~670 visited for 400 kept
    assert stats.skipped["generated gramastar star"] > 40
    assert stats.skipped["icon collection"] > 40


def test_tuxpaint_caption_is_first_line_of_description():
    for pair in IMAGE_SOURCES["tuxpaint"].pairs(16, limit=20, seed=1):
        first_line = (TUXPAINT_STAMPS / pair.id).read_text(encoding="utf-8").splitlines()[0]
        assert pair.caption == " ".join(first_line.split())


@pytest.mark.parametrize("name", sorted(TEXT_SOURCES))
def test_text_source_gives_documents(name):
    stats = SourceStats(name, "", "")
    docs = list(TEXT_SOURCES[name].documents(limit=0, stats=stats))
    assert len(docs) > 1000 and stats.kept == len(docs)
    assert all(text.strip() for _, text in docs)
    assert len({doc_id for doc_id, _ in docs}) == len(docs)
    subset = list(TEXT_SOURCES[name].documents(limit=50, seed=0))
    assert len(subset) == 50 and subset == list(TEXT_SOURCES[name].documents(limit=50, seed=0))


def test_wordnet_has_every_synset():
    # WordNet 3.0: 82,115 noun + 13,767 verb + 18,156 adjective + 3,621 adverb synsets
    docs = list(TEXT_SOURCES["wordnet"].documents(limit=0))
    assert len(docs) == 117_659
    assert any(text.startswith("dog, domestic dog, Canis familiaris (noun): a member of the genus Canis") for _, text in docs)


def test_wikipedia_summaries():
    docs = dict(TEXT_SOURCES["wikipedia"].documents(limit=0))
    assert len(docs) > 9000
    assert docs["2001: A Space Odyssey"].startswith("2001: A Space Odyssey\n")


def test_fashion_mnist_held_out_set():
    images, labels, names = fashion_mnist.load("test")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10  # the test split is balanced
    assert names[0] == "T-shirt/top" and names[9] == "Ankle boot" and len(names) == 10
    train_images, train_labels, _ = fashion_mnist.load("train", limit=100)
    assert train_images.shape == (100, 28, 28) and train_labels.shape == (100,)


@pytest.mark.slow
def test_stage_notebook_executes(tmp_path):
    """The stage notebook, executed by papermill with tiny parameters, leaves every artefact."""
    out_dir = tmp_path / "00_data"
    params = dict(out_dir=str(out_dir), synthetic_pairs=100, real_cap=20, image_size=32, text_cap=200, vocab_size=600)
    assert set(params) <= {f for f in DataStageConfig.__dataclass_fields__}
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "00_data.ipynb"), str(tmp_path / "executed.ipynb"),
        parameters=params, kernel_name="mmafm", cwd=str(ROOT), progress_bar=False,
    )
    manifest = read_manifest(out_dir)
    outputs = manifest["outputs"]
    assert outputs["fashion_mnist"] == str(fashion_mnist.DATA_DIR)
    assert sorted(p.name for p in Path(outputs["pairs_dir"]).glob("*.tar"))[0] == "pairs-train-000000.tar"
    assert Path(outputs["tokenizer"]).is_file() and (Path(outputs["tokens_dir"]) / "meta.json").is_file()
    assert {"samples", "token_lengths"} <= {Path(p).stem for p in manifest["figures"]}
