"""Mixture of experts, sparse upcycling and PT-MoE tracks against plain references."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import mmafm
from mmafm.layers.moe import MoEFeedForward, load_balancing_loss, route_top_k, upcycle_ffn
from mmafm.layers.swiglu import SwiGLU
from mmafm.models.ptmoe import PTMoEModel, sync_points
from mmafm.models.text import TextModel, layer_is_moe, upcycle


def naive_moe(moe: MoEFeedForward, tokens: torch.Tensor) -> torch.Tensor:
    """One token at a time: softmax router, k best experts, renormalised weights, weighted sum."""
    out = torch.zeros_like(tokens)
    for n, token in enumerate(tokens):
        probs = torch.softmax(moe.router.weight @ token, dim=0)
        ranked = sorted(range(moe.num_experts), key=lambda e: -probs[e].item())[: moe.top_k]
        norm = sum(probs[e] for e in ranked)
        for e in ranked:
            hidden = F.silu(moe.w_gate[e] @ token) * (moe.w_up[e] @ token)
            out[n] += probs[e] / norm * (moe.w_down[e] @ hidden)
    return out


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_moe_routing_matches_a_per_token_loop(top_k):
    torch.manual_seed(top_k)
    moe = MoEFeedForward(dim=16, hidden_dim=24, num_experts=5, top_k=top_k, init_std=0.3).double()
    tokens = torch.randn(3, 11, 16, dtype=torch.float64)
    got, _ = moe(tokens)
    want = naive_moe(moe, tokens.reshape(-1, 16)).reshape(3, 11, 16)
    assert torch.allclose(got, want, atol=1e-10)


def test_no_token_is_dropped_when_every_token_picks_the_same_expert():
    torch.manual_seed(0)
    moe = MoEFeedForward(dim=8, hidden_dim=12, num_experts=4, top_k=1, init_std=0.3).double()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2, 0] = 50.0  # every token with feature 0 > 0 goes to expert 2
    tokens = torch.randn(64, 8, dtype=torch.float64)
    tokens[:, 0] = tokens[:, 0].abs() + 0.5
    out, aux = moe(tokens)
    assert torch.allclose(out, moe.expert(2, tokens), atol=1e-10)  # all 64 tokens processed
    assert aux.item() == pytest.approx(4 * 1.0 * torch.softmax(moe.router.weight.double() @ tokens.T, 0)[2].mean().item())


def test_load_balancing_loss_closed_form():
    num_experts = 8
    uniform = torch.full((32, num_experts), 1 / num_experts)
    experts = torch.arange(64).remainder(num_experts).reshape(32, 2)  # every expert equally used
    assert load_balancing_loss(uniform, experts, num_experts).item() == pytest.approx(1.0)
    # everything on expert 0 with probability 1 there: E * 1 * 1 = E
    collapsed = torch.zeros(32, num_experts)
    collapsed[:, 0] = 1
    assert load_balancing_loss(collapsed, torch.zeros(32, 1, dtype=torch.long), num_experts).item() == num_experts
    probs, weights, chosen = route_top_k(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), 2)
    assert chosen.tolist() == [[3, 2]]
    e = torch.exp(torch.tensor([2.0, 3.0]))
    assert torch.allclose(weights, (e / e.sum()).flip(0)[None])


def test_upcycled_ffn_equals_the_dense_ffn():
    torch.manual_seed(0)
    dense = SwiGLU(16, 40).double()
    moe = upcycle_ffn(dense, num_experts=8, top_k=2)
    tokens = torch.randn(2, 9, 16, dtype=torch.float64)
    out, _ = moe(tokens)
    assert torch.allclose(out, dense(tokens), atol=1e-12)
    assert moe.w_gate.shape == (8, 40, 16) and moe.w_down.shape == (8, 16, 40)
    with pytest.raises(TypeError, match="SwiGLU"):
        upcycle_ffn(moe, 4, 2)


def test_upcycled_model_equals_the_dense_model_at_init():
    torch.manual_seed(0)
    dense = mmafm.create_model("afm_2025_device_tiny", init_std=0.1).eval()
    teacher = upcycle(dense, num_experts=4, top_k=2, moe_every=2).eval()
    assert [layer_is_moe(teacher.config, i) for i in range(8)] == [False, True] * 4
    assert teacher.config.num_experts == 4 and "layers.1.ffn.router.weight" in teacher.state_dict()
    ids = torch.randint(0, 2048, (2, 12))
    assert torch.allclose(teacher(ids), dense(ids), atol=1e-5)
    assert teacher.num_params() > dense.num_params()
    # the registered teacher preset has the report's 64 experts every 2 layers
    config = mmafm.get_config("afm_2025_moe_teacher")
    assert (config.num_experts, config.moe_every) == (64, 2)
    assert type(mmafm.create_model("afm_2025_moe_teacher_tiny")) is TextModel
    with pytest.raises(ValueError, match="dense model"):
        upcycle(teacher)


def test_ptmoe_with_identical_tracks_equals_a_single_track_model():
    """Averaging identical tracks changes nothing: PT-MoE then equals the plain decoder."""
    torch.manual_seed(0)
    ptmoe = mmafm.create_model("afm_2025_server_tiny", init_std=0.1).eval()
    single = TextModel(dataclasses.replace(ptmoe.config, num_tracks=1)).eval()
    state = {k: v for k, v in single.state_dict().items()}
    for key in state:
        if key.startswith("layers."):
            state[key] = ptmoe.state_dict()["tracks.0." + key]
        else:
            state[key] = ptmoe.state_dict()[key]
    single.load_state_dict(state)
    with torch.no_grad():
        for name, param in ptmoe.tracks[1].named_parameters():
            param.copy_(ptmoe.tracks[0].get_parameter(name))
    ids = torch.randint(0, 2048, (2, 20))
    assert torch.allclose(ptmoe(ids), single(ids), atol=1e-5)


def test_ptmoe_tracks_exchange_only_at_block_boundaries():
    """Perturbing track 1's layer 5 (block 2 of 2) cannot change what track 0 computed in block 1,
    while with exchange at the boundary, perturbing layer 1 (block 1) changes the final output of
    both tracks; with ``track_exchange="final"`` tracks never see each other."""
    torch.manual_seed(0)
    model = mmafm.create_model("afm_2025_server_tiny", init_std=0.1).eval()
    config = model.config
    assert isinstance(model, PTMoEModel) and config.num_tracks == 2 and config.track_block_depth == 4
    names = {n for n, _ in model.named_parameters()}
    assert "tracks.0.layers.1.ffn.w_gate" in names and "tracks.1.layers.1.ffn.w_gate" in names  # private experts
    assert "tracks.0.layers.0.ffn.w_gate.weight" in names  # even layers dense
    ids = torch.randint(0, 2048, (1, 10))
    hidden_block1 = {}

    def record(track):
        def hook(module, args, output):
            hidden_block1[track] = output[0].detach().clone()
        return hook

    handles = [model.tracks[t].layers[3].register_forward_hook(record(t)) for t in (0, 1)]
    model(ids)
    before = dict(hidden_block1)
    with torch.no_grad():
        model.tracks[1].layers[5].attn.o_proj.weight.mul_(3.0)
    model(ids)
    assert torch.equal(before[0], hidden_block1[0]) and torch.equal(before[1], hidden_block1[1])
    for handle in handles:
        handle.remove()
    # with exchange at boundaries, track 0's second block sees track 1's first block
    final_model = mmafm.create_model("afm_2025_server_tiny", init_std=0.1, track_exchange="final").eval()
    final_model.load_state_dict(model.state_dict())
    outputs = {}
    for label, m in (("mean", model), ("final", final_model)):
        m.tracks[0].layers[7].register_forward_hook(lambda mod, a, out, label=label: outputs.__setitem__(label, out[0]))
    model(ids), final_model(ids)
    base = {k: v.clone() for k, v in outputs.items()}
    with torch.no_grad():
        for m in (model, final_model):
            m.tracks[1].layers[1].attn.o_proj.weight.mul_(3.0)
    model(ids), final_model(ids)
    assert not torch.allclose(base["mean"], outputs["mean"])
    assert torch.equal(base["final"], outputs["final"])


def test_sync_points_are_2L_versus_L_over_D():
    server = mmafm.get_config("afm_2025_server")
    points = sync_points(server)
    assert points == {"tensor_parallel": 2 * server.n_layers,
                      "parallel_track": server.n_layers // 4, "reduction": 0.875}
    assert sync_points(dataclasses.replace(server, track_block_depth=8))["parallel_track"] == server.n_layers // 8
    assert sync_points(dataclasses.replace(server, track_exchange="final"))["parallel_track"] == 1


def test_ptmoe_aux_loss_reaches_the_training_loss():
    torch.manual_seed(0)
    model = mmafm.create_model("afm_2025_server_tiny")
    ids = torch.randint(0, 2048, (2, 16))
    logits = model(ids[:, :-1])
    loss, metrics = model.loss(logits, ids[:, 1:])
    without, _ = model.loss(logits, ids[:, 1:])
    assert metrics["aux_loss"] == pytest.approx(model.aux_loss.item())
    assert 0.0 < metrics["aux_loss"] < model.config.num_experts  # E * sum_e f_e P_e lies in (0, E]
    plain_ce = F.cross_entropy(logits.reshape(-1, 2048), ids[:, 1:].reshape(-1))
    z = torch.logsumexp(logits.reshape(-1, 2048), -1).pow(2).mean()
    expected = plain_ce + model.config.z_loss * z + model.config.aux_loss_coef * model.aux_loss
    assert torch.allclose(loss, expected) and torch.equal(loss, without)
    loss.backward()
    assert model.tracks[0].layers[1].ffn.router.weight.grad.abs().sum() > 0  # the router learns
