"""Mixture-of-experts SwiGLU feed-forward with top-k routing and no token dropping.

Used by the 2025 server model's PT-MoE tracks (every other layer is MoE, experts private to a
track) and by the 2025 MoE teacher, a dense ~3B model sparse-upcycled to 64 experts every 2
layers (2025 report, "Model architecture" and "Pre-training"; Komatsuzaki et al., 2023 for sparse
upcycling).

Routing: a linear router gives each token a softmax over experts; the token goes to its top-k
experts, weighted by their probabilities renormalised over the k chosen (Mixtral-style). Every
token is processed by all of its k experts whatever the load (no capacity factor, no dropping),
so the output never depends on which other tokens share the batch. Load balancing uses the
Switch-Transformer auxiliary loss ``E * sum_e f_e * P_e`` (f_e = fraction of routed slots that go
to expert e, P_e = mean router probability of e); it is 1.0 for perfectly uniform routing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmafm.layers.swiglu import SwiGLU

__all__ = ["MoEFeedForward", "load_balancing_loss", "route_top_k", "upcycle_ffn"]


def route_top_k(
    router_logits: torch.Tensor,  # (N, E)
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing.

    Returns:
        ``(probs (N, E), weights (N, k), experts (N, k))``: the full router softmax, the chosen
        experts' probabilities renormalised to sum to one, and the chosen expert indices.
    """
    probs = router_logits.to(torch.promote_types(router_logits.dtype, torch.float32)).softmax(dim=-1)
    top_probs, experts = probs.topk(top_k, dim=-1)
    weights = top_probs / top_probs.sum(dim=-1, keepdim=True)
    return probs, weights, experts


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-Transformer balance loss ``E * sum_e f_e * P_e`` (1.0 when routing is uniform).

    Args:
        probs: router softmax, (N, E).
        experts: chosen expert indices, (N, k).
        num_experts: E.
    """
    flat = experts.reshape(-1)
    # tokens per expert; scatter_add (unlike bincount) also runs on the meta device and under tracing
    slots = torch.zeros(num_experts, device=flat.device).scatter_add_(0, flat, torch.ones(flat.shape, device=flat.device))
    fraction = slots / experts.numel()  # f_e
    mean_prob = probs.mean(dim=0)  # P_e
    return num_experts * (fraction * mean_prob).sum()


class MoEFeedForward(nn.Module):
    """``num_experts`` SwiGLU experts of width ``hidden_dim`` behind a top-k router.

    Expert weights are stacked: ``w_gate`` and ``w_up`` are (E, hidden, dim), ``w_down`` is
    (E, dim, hidden), so expert ``e`` computes ``w_down[e] @ (silu(w_gate[e] x) * w_up[e] x)``.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int, init_std: float = 0.02):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts, self.top_k = num_experts, top_k
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w_up = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w_down = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        for weight in (self.router.weight, self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(weight, std=init_std)

    def expert(self, index: int, x: torch.Tensor) -> torch.Tensor:  # (n, dim) -> (n, dim)
        """Expert ``index`` applied to the tokens ``x``."""
        hidden = F.silu(F.linear(x, self.w_gate[index])) * F.linear(x, self.w_up[index])
        return F.linear(hidden, self.w_down[index])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Route every token of ``x`` (..., dim) to its top-k experts.

        Returns:
            ``(output (..., dim), load-balancing loss (scalar, not yet scaled by a coefficient))``.
        """
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # (N, dim)
        router_dtype = torch.promote_types(tokens.dtype, torch.float32)  # route in >= fp32
        router_logits = F.linear(tokens.to(router_dtype), self.router.weight.to(router_dtype))  # (N, E)
        probs, weights, experts = route_top_k(router_logits, self.top_k)
        aux = load_balancing_loss(probs, experts, self.num_experts)

        # group the N*k (token, expert) slots by expert, run each expert once on its tokens
        flat_experts = experts.reshape(-1)  # (N*k,)
        order = flat_experts.argsort(stable=True)
        slot_token = order // self.top_k
        slot_weight = weights.reshape(-1)[order]
        if tokens.device.type == "meta":  # no values to route by: a balanced split (its shapes and FLOPs)
            total, experts_ = flat_experts.numel(), self.num_experts
            counts = [total // experts_ + (index < total % experts_) for index in range(experts_)]
        else:
            counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        # one view per expert, taken once: indexing w_gate[index] inside the loop makes autograd
        # build a full (E, hidden, dim) gradient per expert and weight (E x the memory traffic);
        # unbind's backward stacks the E gradients once (same values; 3.8-5.7x faster on CPU, benchmarks/bench_moe.py)
        gates, ups, downs = self.w_gate.unbind(0), self.w_up.unbind(0), self.w_down.unbind(0)
        out = torch.zeros_like(tokens)
        start = 0
        for index, count in enumerate(counts):
            if count:
                token_ids = slot_token[start : start + count]
                chosen = tokens[token_ids]  # (count, dim)
                hidden = F.silu(F.linear(chosen, gates[index])) * F.linear(chosen, ups[index])  # (count, hidden)
                expert_out = F.linear(hidden, downs[index])  # (count, dim), = self.expert(index, chosen)
                weighted = expert_out * slot_weight[start : start + count, None].to(expert_out.dtype)
                out.index_add_(0, token_ids, weighted.to(out.dtype))
            start += count
        return out.reshape(shape), aux

    def extra_repr(self) -> str:
        num_experts, hidden, dim = self.w_gate.shape
        return f"dim={dim}, hidden_dim={hidden}, num_experts={num_experts}, top_k={self.top_k}"


@torch.no_grad()
def upcycle_ffn(dense: SwiGLU, num_experts: int, top_k: int, init_std: float = 0.02) -> MoEFeedForward:
    """Sparse upcycling: an MoE layer whose every expert is a copy of ``dense``.

    The router is freshly initialised; because the k routing weights of a token sum to one and
    all experts are identical, the upcycled layer computes exactly the dense FFN at
    initialisation (up to float rounding), and training then lets the experts diverge.
    """
    if not isinstance(dense, SwiGLU):
        raise TypeError(f"upcycle_ffn expects a SwiGLU feed-forward, got {type(dense).__name__}")
    hidden_dim, dim = dense.w_gate.weight.shape
    weight = dense.w_gate.weight
    with torch.device(weight.device):
        moe = MoEFeedForward(dim, hidden_dim, num_experts, top_k, init_std=init_std).to(weight.dtype)
    moe.w_gate.copy_(dense.w_gate.weight.expand(num_experts, -1, -1))
    moe.w_up.copy_(dense.w_up.weight.expand(num_experts, -1, -1))
    moe.w_down.copy_(dense.w_down.weight.expand(num_experts, -1, -1))
    return moe
