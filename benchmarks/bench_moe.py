"""MoE feed-forward training step (forward + backward), the 2025 teacher's shape at tiny size:
:class:`mmafm.layers.moe.MoEFeedForward` (expert weights unbound into views once per forward)
against the same routing loop indexing ``w_gate[e]`` per expert (its earlier form, whose
backward builds a full ``(E, hidden, dim)`` gradient per expert and weight). Interleaved, one
thread, medians; outputs and gradients must agree exactly.

    .venv/bin/python benchmarks/bench_moe.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from mmafm.layers.moe import MoEFeedForward, load_balancing_loss, route_top_k


def indexed_forward(moe: MoEFeedForward, tokens: torch.Tensor) -> torch.Tensor:  # (N, dim) -> (N, dim)
    """The reference: the same top-k routing, each expert's weights indexed inside the loop."""
    probs, weights, experts = route_top_k(F.linear(tokens, moe.router.weight), moe.top_k)
    aux = load_balancing_loss(probs, experts, moe.num_experts)
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)
    slot_token, slot_weight = order // moe.top_k, weights.reshape(-1)[order]
    out, start = torch.zeros_like(tokens), 0
    for index, count in enumerate(torch.bincount(flat, minlength=moe.num_experts).tolist()):
        if count:
            ids = slot_token[start : start + count]
            out.index_add_(0, ids, moe.expert(index, tokens[ids]) * slot_weight[start : start + count, None])
        start += count
    return out + 0 * aux


def train_step(forward, moe: MoEFeedForward, tokens: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Seconds of one forward + backward, and the output and ``w_gate`` gradient it produced."""
    moe.zero_grad(set_to_none=True)
    start = time.perf_counter()
    out = forward(tokens)
    out.square().mean().backward()
    return time.perf_counter() - start, out.detach(), moe.w_gate.grad.clone()


def main(repeats: int = 7) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    moe = MoEFeedForward(dim=96, hidden_dim=252, num_experts=64, top_k=2)  # afm_2024_device_tiny upcycled to 64
    tokens = torch.randn(8 * 128, 96)  # one batch of the teacher-cost runs: 8 x 128 tokens
    ours, reference = [], []
    for _ in range(repeats):  # interleaved: load on a shared machine hits both alike
        seconds, out, grad = train_step(lambda x: moe(x)[0], moe, tokens)
        ours.append(seconds)
        seconds, out_ref, grad_ref = train_step(lambda x: indexed_forward(moe, x), moe, tokens)
        reference.append(seconds)
        assert torch.equal(out, out_ref) and torch.equal(grad, grad_ref), "the two paths disagree"
    mine, theirs = statistics.median(ours), statistics.median(reference)
    print(f"MoE FFN train step (64 experts, top-2, 1024 tokens, 1 thread): unbound views {mine * 1e3:.1f} ms, "
          f"indexed per expert {theirs * 1e3:.1f} ms, speed-up {theirs / mine:.2f}x (medians of {repeats})")


if __name__ == "__main__":
    main()
