"""LoRA linear with fixed-size adapter slots: ``y = x W^T + b + s_k (x A_k^T) B_k^T``.

Low-rank adaptation (Hu et al., 2021) as the reports use it (REFERENCE.md, "Compression and
adapters"; WAVE2.md, "Adapters"): a frozen base weight ``W`` (out, in) plus, per adapter ``k``, a
down projection ``A_k`` (r, in), an up projection ``B_k`` (out, r) and a scale ``s_k = alpha_k /
r_k``. One module holds ``slots`` adapters at once, stacked::

    lora_A  (slots, rank, in)     lora_B  (slots, out, rank)     scaling  (slots,)

An adapter of rank below the slot rank fills the leading rows of ``A`` / columns of ``B`` and
leaves zeros (which add exactly nothing). Which adapter runs is routing state, not structure:

- ``"single"``: every row uses the slot in the buffer ``active`` (a 0-d long tensor), so
  switching adapters is a ``fill_`` of that buffer: nothing is rebuilt, and a compiled graph
  sees the same module with another buffer value (no recompile);
- ``"mixed"``: row ``b`` of the batch uses slot ``row_ids[b]`` (-1 = the base alone), in one
  batched computation for every adapter at once (never a loop over adapters), by one of two
  strategies that give the same numbers (to float rounding):

  * slot-major (:meth:`LoRALinear._mixed_slot_major`): every slot's down projection in one
    dense GEMM, ``x A_all^T`` with ``A_all`` (S*r, in) a view of ``lora_A``, the other slots'
    columns zeroed by a per-row one-hot mask (B, 1, S*r), then one GEMM by all slots' scaled
    ``B`` side by side (out, S*r) accumulated into the base output (``addmm_``): two plain GEMMs
    that read each factor once, no per-row copy; S times the low-rank multiply-adds, so chosen
    for inference where ``(S - 1) * tokens per row`` is small (:data:`SLOT_MAJOR_WORK`);
  * gathered (:meth:`LoRALinear._mixed`): each row's factors gathered,
    ``bmm(x, A[row_ids]^T)`` then ``baddbmm`` by ``B[row_ids]^T`` into the base output: the
    low-rank work of one adapter per row (longer rows, and autograd);
- ``"off"`` / ``"merged"``: the base alone (merged: the delta was added to ``W``).

The module keeps the base weight under its own name ``weight`` (and ``bias``), so the model's
base tensors keep their state-dict names; ``lora_A`` / ``lora_B`` are added beside them. The mode,
the rows' adapter ids and the dropout are shared by every LoRA module of a model through one
:class:`AdapterRouting` (a plain object, see :mod:`mmafm.lora`, which builds and drives these).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AdapterRouting", "LoRALinear", "MODES", "SLOT_MAJOR_WORK"]

MODES = ("off", "single", "mixed", "merged")
# mixed batches multiply by every slot instead of gathering each row's factors when
# (slots - 1) * tokens per row <= this: the extra multiply-adds are cheaper than the copies
# (a decode step: 1 token per row) [measured: benchmarks/bench_lora.py]
SLOT_MAJOR_WORK = 16


class AdapterRouting:
    """What every LoRA module of one model reads at forward time (one shared object).

    Attributes:
        mode: one of :data:`MODES`.
        row_ids: (B,) long slot per batch row in ``"mixed"`` mode (-1 = base only), else None.
        dropout: dropout probability on the adapter input during training (0 = none).
    """

    def __init__(self, dropout: float = 0.0):
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.mode = "off"
        self.row_ids: torch.Tensor | None = None
        self.dropout = float(dropout)
        self._row_mask: tuple | None = None

    def row_mask(self, slots: int, rank: int, dtype: torch.dtype) -> torch.Tensor:  # (B, 1, S*r)
        """Each row's slot as a one-hot over the S*r columns of all slots' low-rank products
        (ones on columns ``[s*r, (s+1)*r)`` of its slot ``s``, all zero for -1), made once per
        batch for every module."""
        ids = self.row_ids
        key = (id(ids), ids._version, slots, rank, dtype, ids.device)
        if self._row_mask is None or self._row_mask[0] != key:
            mask = F.one_hot(ids.clamp(min=0), slots).to(dtype) * (ids >= 0).to(dtype)[:, None]  # (B, S)
            mask = mask[:, None, :, None].expand(-1, 1, slots, rank).reshape(ids.shape[0], 1, slots * rank)
            self._row_mask = (key, mask.contiguous())
        return self._row_mask[1]


class LoRALinear(nn.Module):
    """A frozen linear plus ``slots`` stacked LoRA adapters of rank up to ``rank``.

    Args:
        linear: the base ``nn.Linear``; its weight and bias Parameters are taken over (same
            objects), so optimizers and tied references keep pointing at them.
        routing: the model's shared :class:`AdapterRouting`.
        slots: adapters held at once.
        rank: the slot rank (the largest adapter rank it can hold).
    """

    def __init__(self, linear: nn.Linear, routing: AdapterRouting, slots: int, rank: int):
        super().__init__()
        if slots < 1 or rank < 1:
            raise ValueError(f"LoRA slots and rank must be >= 1, got slots={slots}, rank={rank}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # (out, in), the base
        self.register_parameter("bias", linear.bias)
        factory = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        self.lora_A = nn.Parameter(torch.zeros(slots, rank, self.in_features, **factory))  # (S, r, in)
        self.lora_B = nn.Parameter(torch.zeros(slots, self.out_features, rank, **factory))  # (S, out, r)
        buffer_device = linear.weight.device
        self.register_buffer("active", torch.zeros((), dtype=torch.long, device=buffer_device), persistent=False)
        self.register_buffer("scaling", torch.zeros(slots, dtype=torch.float32, device=buffer_device),
                             persistent=False)
        self.routing = routing
        self._decode_cache: tuple | None = None
        self._up_cache: tuple | None = None

    @property
    def slots(self) -> int:
        return self.lora_A.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_A.shape[1]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"slots={self.slots}, rank={self.rank}")

    # ------------------------------------------------------------------ slot contents

    @torch.no_grad()
    def init_slot(self, slot: int, rank: int, generator: torch.Generator | None = None) -> None:
        """A fresh adapter in ``slot``: ``A`` Kaiming-uniform on its first ``rank`` rows (as
        peft and the LoRA paper: the adapter starts at zero because ``B`` is zero)."""
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on (r, in)
        values = torch.rand(rank, self.in_features, generator=generator, dtype=torch.float32) * 2 * bound - bound
        self.lora_A[slot, :rank].copy_(values)

    @torch.no_grad()
    def write_slot(self, slot: int, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        """Copy an adapter ``A`` (r, in), ``B`` (out, r) into ``slot`` (zeros beyond ``r``)."""
        rank = lora_A.shape[0]
        if lora_A.shape != (rank, self.in_features) or lora_B.shape != (self.out_features, rank):
            raise ValueError(
                f"adapter shapes A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)} do not fit a linear "
                f"{self.in_features} -> {self.out_features} (expected (r, {self.in_features}), ({self.out_features}, r))"
            )
        if rank > self.rank:
            raise ValueError(f"adapter rank {rank} exceeds the slot rank {self.rank}; attach with rank >= {rank}")
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_A[slot, :rank].copy_(lora_A)
        self.lora_B[slot, :, :rank].copy_(lora_B)

    def read_slot(self, slot: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter in ``slot`` as ``(A (rank, in), B (out, rank))`` copies."""
        return self.lora_A[slot, :rank].detach().clone(), self.lora_B[slot, :, :rank].detach().clone()

    def delta(self, slot: int) -> torch.Tensor:  # (out, in) float32
        """``s_k B_k A_k``: what the adapter in ``slot`` adds to the weight."""
        lora_A, lora_B = self.lora_A[slot].detach().float(), self.lora_B[slot].detach().float()
        return (lora_B @ lora_A) * self.scaling[slot].float()

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        out = F.linear(x, self.weight, self.bias)
        routing = self.routing
        mode = routing.mode
        if mode == "off" or mode == "merged":
            return out
        if routing.dropout > 0.0 and self.training:
            x = F.dropout(x, routing.dropout, training=True)
        if mode == "single":
            slot = self.active.view(1)
            lora_A = self.lora_A.index_select(0, slot)[0]  # (r, in)
            lora_B = self.lora_B.index_select(0, slot)[0]  # (out, r)
            low = F.linear(x, lora_A) * self.scaling.index_select(0, slot).to(x.dtype)  # (..., r)
            # out + low B^T in one GEMM (addmm accumulates into a copy of out: no separate add pass)
            return torch.addmm(out.reshape(-1, self.out_features), low.reshape(-1, low.shape[-1]),
                               lora_B.t()).view(out.shape)
        row_ids = routing.row_ids
        if row_ids is None:
            raise RuntimeError("LoRA mode 'mixed' without row adapter ids; use Adapters.mixed(adapter_ids)")
        rows = row_ids.shape[0]
        if x.dim() < 2 or x.shape[0] != rows:
            raise ValueError(
                f"mixed adapters need the batch rows as the leading dimension: {rows} adapter ids, but this "
                f"LoRA linear got an input of shape {tuple(x.shape)}"
            )
        tokens = x.numel() // (rows * self.in_features)
        if not torch.is_grad_enabled() and (self.slots - 1) * tokens <= SLOT_MAJOR_WORK:
            return self._mixed_slot_major(x, row_ids, out)
        return self._mixed(x, row_ids, out)

    def _mixed(self, x: torch.Tensor, row_ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` plus each batch row through its own adapter: its factors gathered, one batched
        matmul per factor, the second accumulated into ``out`` (``baddbmm``: no separate add)."""
        rows = row_ids.shape[0]
        slot = row_ids.clamp(min=0)
        flat = x.reshape(rows, -1, self.in_features)  # (B, T, in)
        lora_A = self.lora_A.index_select(0, slot)  # (B, r, in)
        lora_B = self.lora_B.index_select(0, slot)  # (B, out, r)
        scale = torch.where(row_ids >= 0, self.scaling.index_select(0, slot), 0.0).to(x.dtype)  # (B,)
        low = torch.bmm(flat, lora_A.transpose(1, 2)) * scale[:, None, None]  # (B, T, r)
        base = out.reshape(rows, -1, self.out_features)  # (B, T, out), a view of F.linear's output
        if torch.is_grad_enabled():
            return torch.baddbmm(base, low, lora_B.transpose(1, 2)).view(out.shape)
        return base.baddbmm_(low, lora_B.transpose(1, 2)).view(out.shape)  # no autograd: in place is safe

    def _mixed_slot_major(self, x: torch.Tensor, row_ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """:meth:`_mixed` for inference on few tokens per row: ``out += ((x A_all^T) * mask)
        (s B_all)^T``, every slot's low-rank product in one GEMM per factor, masked to each row's
        own slot (the other slots' terms are multiplied by exactly 0), accumulated in place."""
        rows, slots, rank = row_ids.shape[0], self.slots, self.rank
        flat = x.reshape(rows, -1, self.in_features)  # (B, T, in)
        low = F.linear(flat, self.lora_A.reshape(slots * rank, self.in_features))  # (B, T, S*r), a view
        low.mul_(self.routing.row_mask(slots, rank, low.dtype))  # (B, 1, S*r) one-hot per row
        out.view(-1, self.out_features).addmm_(low.view(-1, slots * rank), self._up_all().t())
        return out

    def _up_all(self) -> torch.Tensor:  # (out, S*r)
        """All slots' scaled ``B`` side by side (column ``s*r + j`` = ``s_s B_s[:, j]``), copied once
        per change of the factors or scales."""
        lora_B, scaling = self.lora_B, self.scaling
        key = (id(lora_B), lora_B.data_ptr(), lora_B._version, lora_B.dtype, id(scaling), scaling.data_ptr(),
               scaling._version)
        if self._up_cache is None or self._up_cache[0] != key:
            up = self.lora_B.detach() * self.scaling.to(self.lora_B.dtype)[:, None, None]  # (S, out, r)
            up = up.permute(1, 0, 2).reshape(self.out_features, self.slots * self.rank)
            self._up_cache = (key, up.contiguous())
        return self._up_cache[1]

    # ------------------------------------------------------------------ inference plan

    def decode_why(self) -> str:
        """"" when one dense weight (:meth:`decode_weight`) computes this module, else why not
        (what the decode plan asks before running it in a kernel)."""
        if self.routing.mode == "mixed":
            return "LoRA with per-row adapters (a mixed batch)"
        if self.training and self.routing.dropout > 0.0:
            return "LoRA dropout is active"
        return ""

    @torch.no_grad()
    def decode_weight(self) -> torch.Tensor:  # (out, in), the base dtype
        """The dense weight equal to this module now: ``W`` (off, merged) or ``W + s_k B_k A_k``
        for the active adapter, summed in float32. Cached until a weight, a slot, the scales or
        the active slot change (tensor versions), so a decode call pays for it once."""
        mode = self.routing.mode
        if mode in ("off", "merged"):
            return self.weight.detach()
        if mode != "single":
            raise RuntimeError(f"decode_weight: {self.decode_why()}")
        tensors = (self.weight, self.lora_A, self.lora_B, self.scaling, self.active)
        key = tuple((id(t), t._version, t.device, t.dtype) for t in tensors)
        if self._decode_cache is None or self._decode_cache[0] != key:
            slot = int(self.active)
            merged = (self.weight.detach().float() + self.delta(slot)).to(self.weight.dtype).contiguous()
            self._decode_cache = (key, merged)
        return self._decode_cache[1]
