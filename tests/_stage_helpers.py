"""Test helpers shared by several test files (imported as ``from _stage_helpers import ...``):
upstream stage folders laid out as the stages leave them, toy notebooks in a throwaway workspace
for the runner's tests, and a plain greedy decode to compare fast decoding paths against."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def write_data_stage(root: Path, text_cap: int, vocab_size: int = 600):
    """A tiny ``00_data`` folder at ``root / "data"``: jargon + fortunes + wikipedia, ``text_cap``
    documents each, a tokenizer trained on them, token shards (val 20%) and the manifest naming
    them. Returns the tokenizer."""
    from mmafm.data.shards import write_token_shards
    from mmafm.data.text_sources import TEXT_SOURCES
    from mmafm.tokenizer import train_tokenizer

    data = root / "data"
    config = {"text_sources": "jargon,fortunes,wikipedia", "text_cap": text_cap, "seed": 0, "val_fraction": 0.2}
    documents = [(f"{name}/{doc_id}", text) for name in config["text_sources"].split(",")
                 for doc_id, text in TEXT_SOURCES[name].documents(config["text_cap"], 0)]
    tokenizer = train_tokenizer([text for _, text in documents], data / "tokenizer" / "tokenizer", vocab_size=vocab_size)
    write_token_shards(documents, tokenizer, data / "tokens", config["val_fraction"])
    (data / "manifest.json").write_text(json.dumps({
        "stage": "00_data", "status": "complete", "config": config,
        "outputs": {"tokens_dir": str(data / "tokens"), "tokenizer": str(tokenizer.path), "data_dir": str(data)}}))
    return tokenizer


def write_text_stage(folder: Path, stage: str, tokenizer: Any, seq_len: int, seed: int, **overrides: Any) -> Path:
    """A random-init ``afm_2024_device_tiny`` text model (``torch.manual_seed(seed)``, preset
    ``overrides``) saved in ``folder`` as a text stage leaves it: the checkpoint (trained at
    ``seq_len``) and a manifest naming it. Returns the checkpoint path."""
    import mmafm

    torch.manual_seed(seed)
    model = mmafm.create_model("afm_2024_device_tiny", vocab_size=tokenizer.vocab_size, **overrides)
    checkpoint = mmafm.save_model(folder / "checkpoints" / "text_model", model,
                                  {"tokenizer": str(tokenizer.path), "stage_config": {"seq_len": seq_len}})
    (folder / "manifest.json").write_text(json.dumps({
        "stage": stage, "status": "complete",
        "outputs": {"checkpoint": str(checkpoint), "tokenizer": str(tokenizer.path)}}))
    return checkpoint


def toy_notebook(parameters: str, code: str, title: str = "") -> Any:
    """A notebook for the ``mmafm`` Jupyter kernel: a code cell tagged ``parameters`` (where
    papermill injects its values) holding ``parameters``, then one code cell ``code``; with
    ``title``, a markdown heading cell ``# title`` before them."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "mmafm", "display_name": "mmafm", "language": "python"}
    params = nbformat.v4.new_code_cell(parameters)
    params.metadata["tags"] = ["parameters"]
    nb.cells = ([nbformat.v4.new_markdown_cell(f"# {title}")] if title else []) + [params, nbformat.v4.new_code_cell(code)]
    return nb


def toy_workspace(root: Path, monkeypatch: Any, notebooks: dict[str, Any], stage_config: type | None = None) -> Path:
    """``root`` made the workspace (``MMAFM_ROOT``, set through ``monkeypatch``) with each of
    ``notebooks`` written to ``root / "notebooks" / f"{name}.ipynb"``; with ``stage_config``, each
    name is also registered as a stage of that config (its in-process runner does nothing).
    Returns ``root``."""
    import nbformat

    from mmafm.stages import register_stage

    (root / "notebooks").mkdir()
    for name, notebook in notebooks.items():
        if stage_config is not None:
            register_stage(name, stage_config, lambda cfg: {})
        nbformat.write(notebook, root / "notebooks" / f"{name}.ipynb")
    monkeypatch.setenv("MMAFM_ROOT", str(root))
    return root


def naive_greedy(model: torch.nn.Module, ids: list[int], steps: int, stop: int) -> list[int]:
    """Up to ``steps`` greedy tokens after ``ids``, one full forward pass per token (no KV cache),
    stopping before ``stop``: the reference for the decoders under test."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids + out]))[0, -1].argmax())  # (1, T, V) -> last position
            if token == stop:
                break
            out.append(token)
    return out


def epoch_batches(data, count: int) -> list:
    """The batches of ``count`` epochs of a re-iterable, epoch-seeded data source (``set_epoch``)."""
    batches = []
    for epoch in range(count):
        data.set_epoch(epoch)
        batches += list(data)
    return batches
