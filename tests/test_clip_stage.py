"""The 01_clip_pretrain stage end to end on a few self-written shards: outputs, resume, bad data,
and its notebook under papermill."""

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmafm.checkpoint import load_checkpoint, load_model
from mmafm.config import ConfigError
from mmafm.data.shards import ImageTextShards, PairShardWriter
from mmafm.data.synthetic import generate_pairs
from mmafm.stages.clip_pretrain import ClipPretrainConfig, ClipTask, count_pairs, run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthetic pair shards, a small SentencePiece tokenizer and a fake Fashion-MNIST."""
    from mmafm.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("clip_data")
    pairs = list(generate_pairs(96, seed=0, image_size=32))
    with PairShardWriter(root / "pairs", val_fraction=0.2, shard_size=40) as writer:
        for pair in pairs:
            writer.write(pair)
    train_tokenizer([p.caption for p in pairs] * 4, root / "tokenizer" / "tokenizer", vocab_size=300)
    _write_fake_fashion_mnist(root / "fmnist", count=20)
    return root


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def _write_fake_fashion_mnist(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(_idx_bytes(rng.integers(0, 256, (count, 28, 28))))
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(_idx_bytes(np.arange(count) % 10))


def _config(data: Path, out_dir: Path, **overrides) -> ClipPretrainConfig:
    values = dict(
        out_dir=str(out_dir), pairs_dir=str(data / "pairs"), tokenizer=str(data / "tokenizer" / "tokenizer.model"),
        fashion_mnist=str(data / "fmnist"), image_size=32, batch_size=16, max_steps=4, warmup_steps=1,
        num_workers=0, threads=1, eval_pairs=12, fmnist_images=20, ckpt_every=2, log_every=1,
    )
    values.update(overrides)
    return ClipPretrainConfig(**values)


def test_stage_outputs(data, tmp_path):
    outputs = run(_config(data, tmp_path / "stage"))
    manifest = json.loads((tmp_path / "stage" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert set(outputs) >= {"clip_checkpoint", "image_tower", "image_preset", "image_size", "tokenizer"}
    assert outputs["image_preset"] == "vit_base_patch16_tiny" and outputs["image_size"] == "32"
    summary = manifest["summary"]
    for key in ("fmnist_top1", "i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "chance_i2t_R@1"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["fmnist_chance"] == pytest.approx(0.1)
    records = [json.loads(line) for line in (tmp_path / "stage" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    evals = [r for r in records if "eval/fmnist_top1" in r]
    steps_per_epoch = summary["train_pairs"] // 16
    assert [r["step"] for r in evals] == sorted({*range(steps_per_epoch, 5, steps_per_epoch), 4})  # each epoch + end
    assert all("logit_scale" in r for r in records if "loss" in r)
    for name in ("curves", "retrieval_grid", "zero_shot"):
        assert (tmp_path / "stage" / "figures" / f"{name}.png").is_file()
    # the checkpoints load back: by path, and through the stage folder's manifest
    clip = load_model(tmp_path / "stage")
    embedding = clip.encode_text(["a small red circle"])
    assert embedding.shape == (1, 64) and torch.allclose(embedding.norm(dim=-1), torch.ones(1))
    tower = load_model(outputs["image_tower"], family="vit")
    assert load_model(tmp_path / "stage", output="image_tower").state_dict().keys() == tower.state_dict().keys()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(tower.forward_head(tower.forward_features(images), pre_logits=True), clip.image_features(images))


def test_resume_equals_uninterrupted(data, tmp_path, monkeypatch):
    run(_config(data, tmp_path / "straight"))
    original = ClipTask.training_forward
    calls = {"n": 0}

    def crash_on_fourth(self, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated kill at step 4")
        return original(self, batch)

    monkeypatch.setattr(ClipTask, "training_forward", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        run(_config(data, tmp_path / "resumed"))
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    assert json.loads((tmp_path / "resumed" / "checkpoints" / "latest.json").read_text())["step"] == 2
    monkeypatch.setattr(ClipTask, "training_forward", original)
    run(_config(data, tmp_path / "resumed"))  # resumes from step 2
    straight, _ = load_checkpoint(tmp_path / "straight" / "clip")
    resumed, _ = load_checkpoint(tmp_path / "resumed" / "clip")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)
    losses = [json.loads(line).get("loss") for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line).get("loss") for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(expected)


# ------------------------------------------------------------------------------- bad data
def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_bad_samples_are_converted_or_counted(tmp_path):
    grey = Image.new("L", (20, 20), 128)
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent: composited onto white
    good = Image.new("RGB", (20, 20), (0, 0, 255))
    _write_tar(tmp_path / "pairs-train-000000.tar", [
        ("grey", {"png": _png(grey), "txt": b"a grey square"}),
        ("alpha", {"png": _png(rgba), "txt": b"nothing at all"}),
        ("empty", {"png": _png(good), "txt": b"   "}),
        ("broken", {"png": b"not a png", "txt": b"a broken image"}),
        ("good", {"png": _png(good), "txt": b"a blue square"}),
    ])
    dataset = ImageTextShards(tmp_path, 16, train=False, split="train")
    samples = list(dataset)
    assert [caption for _, caption in samples] == ["a grey square", "nothing at all", "a blue square"]
    assert all(image.shape == (3, 16, 16) for image, _ in samples)
    assert dataset.skipped == {"empty caption": 1, "undecodable image": 1}
    white = (1.0 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor([0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(samples[1][0][:, 0, 0], white)
    assert count_pairs([str(tmp_path / "pairs-train-000000.tar")]) == 5


def test_missing_or_wrong_inputs_are_clear_errors(data, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image-text shards found"):
        run(_config(data, tmp_path / "a", pairs_dir=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="pairs_dir is empty"):
        run(_config(data, tmp_path / "b", pairs_dir=""))
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        run(_config(data, tmp_path / "c", tokenizer=str(tmp_path / "nope.model")))
    with pytest.raises(ValueError, match="fewer than one batch"):
        run(_config(data, tmp_path / "d", batch_size=500))
    with pytest.raises(ConfigError, match="not a vision preset"):
        run(_config(data, tmp_path / "e", image_preset="clip_tiny"))
    with pytest.raises(ValueError, match="does not support FLIP"):
        run(_config(data, tmp_path / "f", image_preset="vitdet_large_patch16_tiny", mask_ratio=0.5))


# ------------------------------------------------------------------------------- notebook
@pytest.mark.slow
def test_notebook_runs_under_papermill(data, tmp_path):
    papermill = pytest.importorskip("papermill")
    out_dir = tmp_path / "nb"
    params = dict(
        out_dir=str(out_dir), pairs_dir=str(data / "pairs"), tokenizer=str(data / "tokenizer" / "tokenizer.model"),
        fashion_mnist=str(data / "fmnist"), image_size=32, batch_size=16, max_steps=3, warmup_steps=1,
        num_workers=0, eval_pairs=12, fmnist_images=20, ckpt_every=0, log_every=1,
    )
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "01_clip_pretrain.ipynb"), str(tmp_path / "executed.ipynb"),
        parameters=params, kernel_name="mmafm", progress_bar=False, cwd=str(ROOT),
    )
    assert json.loads((out_dir / "manifest.json").read_text())["status"] == "complete"


def test_random_grayscale_matches_torchvision():
    from torchvision.transforms.functional import rgb_to_grayscale

    from mmafm.data.shards import IMAGE_MEAN, IMAGE_STD
    from mmafm.stages.clip_pretrain import random_grayscale

    pixels = torch.rand(4, 3, 8, 8)
    mean, std = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    normalized = (pixels - mean) / std
    grey = random_grayscale(normalized, 1.0) * std + mean
    torch.testing.assert_close(grey, rgb_to_grayscale(pixels, num_output_channels=3), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(random_grayscale(normalized, 0.0), normalized)
