"""Shared pytest setup: one torch thread (tiny models; CI has 2 cores), deterministic seeds, and a
tiny trained-format text model with its tokenizer."""

import json
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub at run time
torch.set_num_threads(1)  # tiny models: one thread avoids sync overhead; CI has 2 cores


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def text_checkpoint(tmp_path_factory):
    """A tiny text model saved the way 02_text_pretrain saves it, with a real tokenizer and a stage
    folder (manifest) naming both: ``{"root", "stage_dir", "checkpoint", "model", "tokenizer"}``."""
    import mmafm
    from mmafm.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("text_checkpoint")
    captions = [f"a {c} {s} on the left" for c in ("red", "blue", "green") for s in ("circle", "square")] * 20
    tokenizer = train_tokenizer(captions, root / "tok", vocab_size=300)
    torch.manual_seed(0)
    model = mmafm.create_model("afm_2024_device_tiny", vocab_size=tokenizer.vocab_size).eval()
    tokenizer_path = str(root / "tok.model")
    checkpoint = mmafm.save_model(root / "stage" / "checkpoints" / "text_model", model, {"tokenizer": tokenizer_path})
    (root / "stage" / "manifest.json").write_text(json.dumps({
        "stage": "02_text_pretrain", "status": "complete",
        "outputs": {"checkpoint": str(checkpoint), "tokenizer": tokenizer_path},
    }))
    return {"root": root, "stage_dir": root / "stage", "checkpoint": checkpoint, "model": model,
            "tokenizer": tokenizer}
