"""Soft-Top-K masks and FFN pruning (mmafm.train.prune).

References: cvxpy (Clarabel, an interior-point conic solver) solving the same entropy-regularised
top-k problem from its primal; torch.topk for the hard limit; finite differences
(torch.autograd.gradcheck) and the closed-form implicit derivative for the gradients; the masked
model itself (hard masks) for the materialized model's logits.
"""

from __future__ import annotations

import pytest
import torch

import mmafm
from mmafm.train.prune import attach_ffn_masks, hard_top_k, materialize, soft_top_k


def cvxpy_soft_top_k(scores: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """argmax_l s.l + eps * sum(-l log l), 0 <= l <= 1, sum(l) = k, solved by cvxpy."""
    cp = pytest.importorskip("cvxpy")
    mask = cp.Variable(scores.numel())
    problem = cp.Problem(cp.Maximize(scores.double().numpy() @ mask + temperature * cp.sum(cp.entr(mask))),
                         [mask >= 0, mask <= 1, cp.sum(mask) == k])
    problem.solve(solver="CLARABEL", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10, max_iter=500)
    assert problem.status.startswith("optimal"), problem.status
    return torch.tensor(mask.value)


@pytest.mark.parametrize("n,k,temperature", [(10, 3, 0.5), (20, 7, 0.1), (30, 1, 2.0), (50, 45, 1.0),
                                             (40, 10, 0.02), (25, 12, 5.0)])
def test_soft_top_k_matches_an_independent_solver(n, k, temperature):
    scores = torch.randn(n, dtype=torch.float64) * 2
    mask = soft_top_k(scores, k, temperature)
    assert torch.allclose(mask, cvxpy_soft_top_k(scores, k, temperature), atol=1e-5, rtol=0)
    assert mask.sum().item() == pytest.approx(k, abs=1e-9)
    assert mask.min() >= 0 and mask.max() <= 1


def test_soft_top_k_rows_are_independent_and_sum_to_k():
    scores = torch.randn(5, 64) * 3
    masks = soft_top_k(scores, 20, 0.3)
    assert torch.allclose(masks.sum(-1), torch.full((5,), 20.0), atol=1e-4)
    for row in range(5):
        assert torch.allclose(masks[row], soft_top_k(scores[row], 20, 0.3), atol=1e-6)


def test_hard_limit_is_torch_topk():
    scores = torch.randn(4, 100)
    hard = torch.zeros_like(scores).scatter_(-1, scores.topk(30, dim=-1).indices, 1.0)
    assert torch.equal(soft_top_k(scores, 30, 0.0), hard) and torch.equal(hard_top_k(scores, 30), hard)
    # as the temperature goes to 0 the soft mask converges to it
    gaps = [(soft_top_k(scores, 30, t) - hard).abs().max().item() for t in (1.0, 0.1, 0.01, 1e-4)]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-6
    # and to k/n everywhere as it grows
    assert torch.allclose(soft_top_k(scores, 30, 1e6), torch.full_like(scores, 0.3), atol=1e-4)


def test_gradients_are_the_implicit_derivative():
    scores = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: soft_top_k(s, 4, 0.7), (scores,))
    # closed form: dl_i/ds_j = [i, j free] l_i / eps (delta_ij - l_j / sum_free l)
    s = torch.tensor([3.0, 2.9, 0.1, -0.5, -1.0, 0.3], dtype=torch.float64, requires_grad=True)
    eps = 0.5
    mask = soft_top_k(s, 3, eps)
    free = mask.detach() < 1 - 1e-12
    assert 0 < free.sum() < 6  # some saturated, some free: both cases covered
    jacobian = torch.autograd.functional.jacobian(lambda x: soft_top_k(x, 3, eps), s.detach())
    lam = torch.where(free, mask.detach(), torch.zeros_like(mask))
    expected = (torch.diag(lam) - lam[:, None] * lam[None, :] / lam.sum()) / eps
    assert torch.allclose(jacobian, expected, atol=1e-10)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="k must be an integer in"):
        soft_top_k(torch.randn(5), 6, 1.0)
    with pytest.raises(ValueError, match="temperature must be"):
        soft_top_k(torch.randn(5), 2, -1.0)
    assert torch.equal(soft_top_k(torch.randn(5), 0, 1.0), torch.zeros(5))
    assert torch.equal(soft_top_k(torch.randn(5), 5, 1.0), torch.ones(5))
    model = mmafm.create_model("afm_2024_device_tiny", vocab_size=64)
    with pytest.raises(ValueError, match="keep must be in"):
        attach_ffn_masks(model, 1000)


@pytest.mark.parametrize("preset", ["afm_2024_device_tiny", "afm_2025_device_tiny", "afm_2025_moe_teacher_tiny"])
def test_materialized_model_computes_the_hard_masked_model(preset, tmp_path):
    model = mmafm.create_model(preset, vocab_size=96).eval()
    width = model.config.ffn_dim
    masked = attach_ffn_masks(model, width // 3, temperature=0.5)
    with torch.no_grad():  # scores that disagree with the magnitude init
        for scores in masked.masks.scores:
            scores.copy_(torch.randn_like(scores))
    masked.masks.hard = True
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        expected = masked(ids)
    pruned = materialize(masked)
    assert pruned.config.ffn_dim == width // 3 and pruned.model_spec.preset == preset
    assert pruned.model_spec.overrides["ffn_dim"] == width // 3
    with torch.no_grad():
        assert torch.allclose(pruned(ids), expected, atol=1e-5)
    assert pruned.num_params() < model.num_params()
    # a plain model: save / load round trip, generation
    path = mmafm.save_model(tmp_path / "pruned", pruned, {"note": "pruned"})
    loaded = mmafm.load_model(path)
    with torch.no_grad():
        assert torch.equal(loaded(ids), pruned(ids))
    from mmafm.inference import generate

    assert len(generate(loaded, [[1, 2, 3]], 4)[0]) == 4


def test_masks_learn_and_anneal():
    model = mmafm.create_model("afm_2024_device_tiny", vocab_size=64)
    masked = attach_ffn_masks(model, 100, temperature=1.0, final_temperature=0.01, anneal_steps=10)
    assert masked.masks.current_temperature() == pytest.approx(1.0)
    assert torch.allclose(masked.masks.masks().sum(-1), torch.full((4,), 100.0), atol=1e-3)
    optimizer = torch.optim.AdamW(masked.masks.parameters(), lr=0.1)
    masked.train()
    ids = torch.randint(0, 64, (2, 8))
    before = [s.detach().clone() for s in masked.masks.scores]
    for _ in range(10):
        logits = masked(ids)
        loss, _ = masked.loss(logits[:, :-1], ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert int(masked.masks.steps) == 10
    assert masked.masks.current_temperature() == pytest.approx(0.01)
    assert all(not torch.equal(b, s) for b, s in zip(before, masked.masks.scores))
    # the model's own parameter names are untouched: its state dict loads into a fresh model
    fresh = mmafm.create_model("afm_2024_device_tiny", vocab_size=64)
    fresh.load_state_dict(masked.remove().state_dict())
    assert "masks.scores.0" in dict(masked.named_parameters())


def test_materialized_model_exports_to_transformers():
    """The pruned model is a plain model: Hugging Face export computes its logits."""
    pytest.importorskip("transformers")
    from mmafm.interop.hf import to_hf

    model = mmafm.create_model("afm_2024_device_tiny", vocab_size=96).eval()
    masked = attach_ffn_masks(model, 80)
    masked.masks.hard = True
    pruned = materialize(masked)
    hf_model = to_hf(pruned).eval()
    assert hf_model.config.intermediate_size == 80
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        assert torch.allclose(hf_model(ids).logits.float(), pruned(ids), atol=1e-4)
