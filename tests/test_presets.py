"""Every registered preset, swept (timm's ``tests/test_models.py``): a guard against silent change.

Tiny presets (names ending ``_tiny``) run on the CPU: forward with a dummy input of their family,
output shapes against closed-form sizes, backward (every trainable parameter gets a finite
gradient), ``no_weight_decay()`` naming real parameters, and gradient checkpointing giving the
same loss and gradients as without it (and actually recomputing in backward). Full-size presets
are built on the meta device (nothing allocated) and their parameter counts compared with the
README's "Full-size parameter counts" table, copied below as the closed-form expected values.

A preset registered later is swept automatically: a full-size one without a README number, or
a preset of a family this file has no dummy input for, fails naming the preset.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmafm

# README.md, "Full-size parameter counts" (computed there by preset_table on the meta device).
README_PARAMS = {
    "afm_2024_device": 2_737_739_264,
    "afm_2025_device": 3_111_368_064,
    "afm_2025_moe_teacher": 75_252_872_576,
    "afm_2025_server": 84_473_071_616,
    "afm_vl_2025_device": 3_467_814_272,
    "afm_vl_2025_server": 85_549_801_088,
    "clip_vit_base_patch16": 149_619_969,
    "clip_vit_giant_patch14": 1_367_759_617,
    "clip_vitdet_large_patch16_rw": 428_436_737,
    "vit_base_patch16": 85_798_656,
    "vit_giant_patch14": 1_012_285_184,
    "vit_large_patch16": 303_301_632,
    "vitdet_large_patch16": 303_998_976,
    "vitdet_large_patch16_rw": 304_000_000,
}

ALL = mmafm.list_models()
TINY = [name for name in ALL if name.endswith("_tiny")]
FULL = [name for name in ALL if not name.endswith("_tiny")]
FAMILIES = ("vit", "vitdet", "text", "ptmoe", "clip", "multimodal")
BATCH = 2
TEXT_LEN = 24  # > the PT-MoE tiny sliding window (16), so the local-attention mask is exercised


def family_of(name: str) -> str:
    """The family a preset is registered under, from the public ``list_models(family=...)``."""
    found = [family for family in FAMILIES if name in mmafm.list_models(family=family)]
    if len(found) != 1:
        pytest.fail(
            f"preset {name!r} is in families {found}; tests/test_presets.py knows {list(FAMILIES)}: "
            f"add a dummy input for its family"
        )
    return found[0]


# --------------------------------------------------------------------------- dummy inputs per family
# Each runner does one forward of a fresh model on a dummy batch, checks the output shapes against
# sizes computed from the config, and returns a scalar loss that depends on every parameter.
def _images(side: int, generator: torch.Generator) -> torch.Tensor:  # (B, 3, S, S)
    return torch.randn(BATCH, 3, side, side, generator=generator)


def _run_vit(name: str, model: nn.Module, generator: torch.Generator) -> torch.Tensor:
    config = model.config
    images = _images(config.img_size, generator)
    tokens = model.forward_features(images)  # (B, 1 + N, C): [CLS] then the patch grid
    grid = config.img_size // config.patch_size
    assert tokens.shape == (BATCH, int(config.class_token) + grid * grid, config.embed_dim), name
    pooled = model.forward_head(tokens)  # (B, C): no classifier head in these presets
    assert pooled.shape == (BATCH, config.embed_dim), name
    return pooled.pow(2).mean()


def _run_vitdet(name: str, model: nn.Module, generator: torch.Generator) -> torch.Tensor:
    config = model.config
    images = _images(config.img_size, generator)
    feature_map = model.forward_features(images)  # (B, C, Gh, Gw) after the neck
    grid = config.img_size // config.patch_size
    assert feature_map.shape == (BATCH, config.neck_channels or config.embed_dim, grid, grid), name
    pooled = model.forward_head(feature_map)  # (B, C)
    assert pooled.shape == (BATCH, feature_map.shape[1]), name
    return pooled.pow(2).mean()


def _run_decoder(name: str, model: nn.Module, generator: torch.Generator) -> torch.Tensor:
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (BATCH, TEXT_LEN + 1), generator=generator)
    logits = model(ids[:, :-1])  # (B, T, V)
    assert logits.shape == (BATCH, TEXT_LEN, vocab) and logits.dtype == torch.float32, name
    loss, metrics = model.loss(logits, ids[:, 1:])
    assert loss.ndim == 0 and "ce" in metrics, name
    return loss


def _caption_tokens(text_config, generator: torch.Generator) -> torch.Tensor:  # (B, T)
    """Captions laid out as the CLIP tokenizer makes them: ids, one end token, then padding."""
    length = text_config.context_length
    reserved = torch.tensor([text_config.pad_id, text_config.eot_id])
    filler = next(i for i in range(text_config.vocab_size) if i not in reserved)
    ids = torch.randint(0, text_config.vocab_size, (BATCH, length), generator=generator)
    ids[torch.isin(ids, reserved)] = filler  # pad / end ids only where the layout puts them
    for row, end in enumerate(torch.randint(2, length, (BATCH,), generator=generator).tolist()):
        ids[row, end] = text_config.eot_id
        ids[row, end + 1 :] = text_config.pad_id
    return ids


def _run_clip(name: str, model: nn.Module, generator: torch.Generator) -> torch.Tensor:
    config = model.config
    images = _images(config.image_size, generator)
    out = model(images, _caption_tokens(config.text, generator))
    for key in ("image_features", "text_features"):
        assert out[key].shape == (BATCH, config.embed_dim), (name, key)
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(BATCH))  # L2-normalized
    # symmetric InfoNCE written out (CLIP's loss), so the logit scale gets a gradient too
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T  # (B, B)
    if "logit_bias" in out:
        logits = logits + out["logit_bias"]
    targets = torch.arange(BATCH)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def _run_multimodal(name: str, model: nn.Module, generator: torch.Generator) -> torch.Tensor:
    config = model.config
    vocab = model.text.config.vocab_size
    ids = torch.randint(config.image_token_id + 1, vocab, (BATCH, TEXT_LEN), generator=generator)
    ids[:, 1] = config.image_token_id  # one image per row, after a first text token
    images = _images(config.balanced_size, generator)  # the default (balanced) mode's side
    out = model(ids, images, labels=ids)
    expanded = TEXT_LEN - 1 + config.num_image_tokens  # each placeholder -> the mode's image tokens
    assert out.logits.shape == (BATCH, expanded, vocab), name
    assert int(out.image_mask.sum()) == BATCH * config.num_image_tokens, name
    assert out.loss is not None and out.loss.ndim == 0, name
    return out.loss


RUNNERS: dict[str, Callable[[str, nn.Module, torch.Generator], torch.Tensor]] = {
    "vit": _run_vit,
    "vitdet": _run_vitdet,
    "text": _run_decoder,
    "ptmoe": _run_decoder,
    "clip": _run_clip,
    "multimodal": _run_multimodal,
}


def _loss_and_grads(name: str, grad_checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """A fresh seeded model's loss, its gradients, and how many module forwards ran in backward."""
    torch.manual_seed(0)
    model = mmafm.create_model(name)
    model.set_grad_checkpointing(grad_checkpointing)
    model.train()
    loss = RUNNERS[family_of(name)](name, model, torch.Generator().manual_seed(1))
    recomputed = 0

    def count(*_):
        nonlocal recomputed
        recomputed += 1

    hooks = [module.register_forward_hook(count) for module in model.modules()]
    loss.backward()
    for hook in hooks:
        hook.remove()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, recomputed


# ------------------------------------------------------------------------------------------ tests
def test_every_preset_is_swept():
    """Tiny + full = all presets; every full-size one has its README number and vice versa."""
    assert TINY and FULL
    assert sorted(FULL) == sorted(README_PARAMS), (
        "full-size presets and README's parameter table differ: add the preset's count to "
        "README.md and README_PARAMS (from `mmafm list models --params`)"
    )
    for name in ALL:
        family_of(name)


@pytest.mark.parametrize("name", ALL)
def test_preset_has_the_model_interface(name):
    """Every preset (full-size ones on meta) has the methods the trainer and stages call."""
    model = mmafm.create_model(name, device="meta")
    for method in ("no_weight_decay", "set_grad_checkpointing", "forward"):
        assert callable(getattr(model, method, None)), f"preset {name!r} has no {method}()"


@pytest.mark.parametrize("name", ALL)
def test_no_weight_decay_names_parameters(name):
    """Each name ``no_weight_decay()`` returns is a parameter, or a module prefix of one (the
    optimizer's matching rule)."""
    model = mmafm.create_model(name, device="meta")
    params = {n for n, _ in model.named_parameters()}
    missing = sorted(
        entry for entry in model.no_weight_decay()
        if entry not in params and not any(p.startswith(entry + ".") for p in params)
    )
    assert not missing, f"preset {name!r}: no_weight_decay() names no parameter for {missing}"


@pytest.mark.parametrize("name", FULL)
def test_full_size_parameter_count(name):
    model = mmafm.create_model(name, device="meta")
    assert all(p.is_meta for p in model.parameters()), f"preset {name!r} allocated memory on meta"
    count = sum(p.numel() for p in model.parameters())
    assert count == README_PARAMS[name], f"preset {name!r}: {count:,} parameters, README says {README_PARAMS[name]:,}"


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_backward_checkpointing(name):
    """Forward shapes, finite gradients for every trainable parameter, and gradient checkpointing
    equal to the plain backward (to float32 reassociation noise) while really recomputing."""
    loss, grads, recomputed = _loss_and_grads(name, grad_checkpointing=False)
    assert torch.isfinite(loss), f"preset {name!r}: loss {loss}"
    assert grads, f"preset {name!r} has no trainable parameters"
    no_grad = sorted(n for n, g in grads.items() if g is None)
    assert not no_grad, f"preset {name!r}: no gradient reaches {no_grad}"
    not_finite = sorted(n for n, g in grads.items() if not torch.isfinite(g).all())
    assert not not_finite, f"preset {name!r}: non-finite gradients in {not_finite}"
    assert sum(g.abs().sum() for g in grads.values()) > 0, f"preset {name!r}: all gradients are zero"
    assert recomputed == 0, f"preset {name!r}: modules ran forward in backward without checkpointing"

    loss_ckpt, grads_ckpt, recomputed_ckpt = _loss_and_grads(name, grad_checkpointing=True)
    assert recomputed_ckpt > 0, f"preset {name!r}: set_grad_checkpointing(True) recomputes nothing"
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=1e-7, msg=f"preset {name!r}: loss")
    assert grads_ckpt.keys() == grads.keys()
    for param_name, grad in grads.items():
        torch.testing.assert_close(
            grads_ckpt[param_name], grad, rtol=1e-5, atol=1e-6, msg=f"preset {name!r}: grad of {param_name}"
        )
