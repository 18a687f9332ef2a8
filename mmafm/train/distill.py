"""Knowledge distillation for text pretraining: the 2024 top-1 target, forward KL, a label cache.

The 2024 on-device model pretrains with a distillation target (WAVE2.md "Distillation and
pruning", REFERENCE.md "2024 pretraining"): the convex combination ``w * one-hot(teacher top-1) +
(1 - w) * one-hot(true label)`` with ``w = 0.9`` [paper], for the whole core stage. Its
cross-entropy is ``(1 - w) CE(label) + w CE(teacher top-1)``. The usual alternative (torchtune's
KD recipes, TRL's GKD) matches the teacher's full distribution: forward
``KL(p_teacher || p_student)`` at a temperature ``tau``, scaled by ``tau^2`` so its gradients keep
their size as ``tau`` changes (Hinton et al. 2015), mixed as ``(1 - w) CE + w tau^2 KL``.

- :func:`top1_distillation_loss`: the 2024 target.
- :func:`chunked_forward_kl`: forward KL from final hidden states and output matrices, computed
  chunk by chunk over the vocabulary with its own backward, so no (tokens, vocab) tensor of
  probabilities is ever held: memory is ``O(tokens x chunk)`` whatever the vocabulary.
- :func:`topk_forward_kl`: forward KL against a cached top-k of the teacher's logits
  (renormalised over those k), when the teacher is not run at all.
- :func:`build_teacher_cache` / :class:`TeacherLabelShards`: the teacher's top-1 per training
  token (4 bytes, uint32) written once into the distilling run's folder, keyed by the teacher's
  fingerprint (and optionally its top-k logits; the token shards are only read), read back
  aligned with :class:`~mmafm.data.shards.TokenShards`' windows, so a distillation step costs
  one student pass.
- :class:`DistillTask`: the text-pretraining task with any of these targets, for the shared
  trainer; :func:`distill_training_kwargs` sets it up for ``02_text_pretrain``.
- :func:`upcycled_teacher` / :func:`train_flops_per_token`: the 2025 MoE teacher (a dense model
  sparse-upcycled to 64 experts every 2 layers) and the training FLOPs that price teachers.

The teacher sees exactly the windows the student trains on (``seq_len`` tokens from a window
start), so a cached prediction is what an online teacher would give for that position.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

__all__ = [
    "UNSET",
    "DISTILL_LOSSES",
    "top1_distillation_loss",
    "chunked_forward_kl",
    "topk_forward_kl",
    "teacher_fingerprint",
    "default_cache_dir",
    "build_teacher_cache",
    "read_teacher_cache",
    "TeacherLabelShards",
    "DistillTask",
    "distill_training_kwargs",
    "bytes_per_token",
    "train_flops_per_token",
    "upcycled_teacher",
]

UNSET = np.iinfo(np.uint32).max  # cache entry of a position no training window covers
DISTILL_LOSSES = ("top1", "kl")
CACHE_VERSION = 1


# ----------------------------------------------------------------------------------- losses
def top1_distillation_loss(
    logits: torch.Tensor,  # (B, T, V)
    targets: torch.Tensor,  # (B, T) true next tokens; ignore_index = not scored
    teacher_top1: torch.Tensor,  # (B, T) the teacher's argmax; ignore_index = use the label
    weight: float = 0.9,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Cross-entropy against ``weight * one-hot(teacher_top1) + (1 - weight) * one-hot(targets)``,
    the mean over scored tokens (2024 report: weight 0.9 on the teacher).

    Raises:
        ValueError: a weight outside [0, 1] or mismatched shapes.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"distillation weight must be in [0, 1], got {weight}")
    if logits.shape[:-1] != targets.shape or teacher_top1.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)}, targets {tuple(targets.shape)} and teacher labels "
                         f"{tuple(teacher_top1.shape)} must agree on (batch, time)")
    log_probs = logits.float().log_softmax(dim=-1).flatten(0, 1)  # (N, V)
    labels, teacher = targets.reshape(-1), teacher_top1.reshape(-1).to(targets.dtype)
    keep = labels != ignore_index
    teacher = torch.where(teacher == ignore_index, labels, teacher)  # no teacher label: the true one
    count = keep.sum().clamp(min=1)
    nll_label = -log_probs.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    nll_teacher = -log_probs.gather(1, teacher.clamp(min=0)[:, None])[:, 0]
    per_token = (1.0 - weight) * nll_label + weight * nll_teacher
    return (per_token * keep).sum() / count


class _ChunkedForwardKL(torch.autograd.Function):
    """``tau^2 sum_n w_n KL(softmax(t_n / tau) || softmax(s_n / tau))`` with ``s = h_s W_s^T`` and
    ``t = h_t W_t^T`` computed a vocabulary chunk at a time, forward and backward."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, token_weight,
                temperature: float, chunk_size: int):
        hs, ws = student_hidden.float(), student_weight.float()  # (N, d), (V, d)
        ht, wt = teacher_hidden.float(), teacher_weight.float()  # (N, dt), (V, dt)
        vocab = ws.shape[0]
        lse_s = torch.full((hs.shape[0],), float("-inf"), device=hs.device)  # (N,)
        lse_t = torch.full_like(lse_s, float("-inf"))
        for start in range(0, vocab, chunk_size):  # pass 1: both log-partition functions
            lse_s = torch.logaddexp(lse_s, (hs @ ws[start : start + chunk_size].T / temperature).logsumexp(-1))
            lse_t = torch.logaddexp(lse_t, (ht @ wt[start : start + chunk_size].T / temperature).logsumexp(-1))
        kl = torch.zeros_like(lse_s)
        for start in range(0, vocab, chunk_size):  # pass 2: sum_v p_t (log p_t - log p_s)
            log_ps = hs @ ws[start : start + chunk_size].T / temperature - lse_s[:, None]  # (N, C)
            log_pt = ht @ wt[start : start + chunk_size].T / temperature - lse_t[:, None]
            kl += (log_pt.exp() * (log_pt - log_ps)).sum(-1)
        ctx.save_for_backward(student_hidden, student_weight, teacher_hidden, teacher_weight, token_weight, lse_s, lse_t)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return temperature**2 * (token_weight.float() * kl).sum()

    @staticmethod
    def backward(ctx, grad_output):
        student_hidden, student_weight, teacher_hidden, teacher_weight, token_weight, lse_s, lse_t = ctx.saved_tensors
        tau, chunk = ctx.temperature, ctx.chunk_size
        hs, ws = student_hidden.float(), student_weight.float()
        ht, wt = teacher_hidden.float(), teacher_weight.float()
        # d/ds_v of tau^2 KL = tau (p_s - p_t)_v per token, times the token's weight
        scale = grad_output.float() * tau * token_weight.float()[:, None]  # (N, 1)
        grad_hidden = torch.zeros_like(hs) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(ws) if ctx.needs_input_grad[1] else None
        for start in range(0, ws.shape[0], chunk):
            ps = (hs @ ws[start : start + chunk].T / tau - lse_s[:, None]).exp()  # (N, C)
            pt = (ht @ wt[start : start + chunk].T / tau - lse_t[:, None]).exp()
            grad_logits = scale * (ps - pt)  # (N, C)
            if grad_hidden is not None:
                grad_hidden += grad_logits @ ws[start : start + chunk]
            if grad_weight is not None:
                grad_weight[start : start + chunk] = grad_logits.T @ hs
        return (None if grad_hidden is None else grad_hidden.to(student_hidden.dtype),
                None if grad_weight is None else grad_weight.to(student_weight.dtype),
                None, None, None, None, None)


def chunked_forward_kl(
    student_hidden: torch.Tensor,  # (..., d) final-norm hidden states
    student_weight: torch.Tensor,  # (V, d) output matrix (the tied embedding)
    teacher_hidden: torch.Tensor,  # (..., dt)
    teacher_weight: torch.Tensor,  # (V, dt)
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,  # (...) bool: tokens scored; None = all
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Mean over scored tokens of ``tau^2 KL(p_teacher || p_student)``, both softmaxes at
    temperature ``tau``, chunked over the vocabulary (memory ``O(tokens x chunk_size)``).

    Gradients flow to ``student_hidden`` and ``student_weight`` only (the teacher is fixed).
    """
    if temperature <= 0 or chunk_size < 1:
        raise ValueError(f"temperature must be > 0 and chunk_size >= 1, got {temperature} and {chunk_size}")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student vocabulary {student_weight.shape[0]} != teacher vocabulary {teacher_weight.shape[0]}")
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    if hs.shape[0] != ht.shape[0]:
        raise ValueError(f"student and teacher hidden states cover {hs.shape[0]} and {ht.shape[0]} tokens")
    keep = torch.ones(hs.shape[0], device=hs.device) if mask is None else mask.reshape(-1).float()
    token_weight = keep / keep.sum().clamp(min=1)
    return _ChunkedForwardKL.apply(hs, student_weight, ht, teacher_weight.detach(), token_weight, float(temperature),
                                   int(chunk_size))


def topk_forward_kl(
    student_logits: torch.Tensor,  # (..., V)
    topk_ids: torch.Tensor,  # (..., k) the teacher's top-k token ids
    topk_logits: torch.Tensor,  # (..., k) their logits
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,  # (...) bool
) -> torch.Tensor:
    """Mean over scored tokens of ``tau^2 KL(q || p_student)`` with ``q`` the teacher's softmax
    renormalised over its cached top-k (the student's full softmax on the other side)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_ps = (student_logits.float() / temperature).log_softmax(dim=-1).gather(-1, topk_ids.long())  # (..., k)
    log_q = (topk_logits.float() / temperature).log_softmax(dim=-1)
    kl = (log_q.exp() * (log_q - log_ps)).sum(-1)  # (...)
    keep = torch.ones_like(kl) if mask is None else mask.float()
    return temperature**2 * (kl * keep).sum() / keep.sum().clamp(min=1)


# ----------------------------------------------------------------------------------- the cache
@torch.no_grad()
def teacher_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the teacher's tensors (names, shapes, bytes): the cache's identity."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def default_cache_dir(cache_root: str | Path, fingerprint: str, seq_len: int) -> Path:
    """``<cache_root>/<fingerprint[:16]>-T<seq_len>``: one folder per teacher and window length.

    ``cache_root`` belongs to the run that distils (``02_text_pretrain`` uses
    ``<out_dir>/teacher_cache``), never to the data stage: the token folder is an earlier stage's
    output and is only read."""
    return Path(cache_root) / f"{fingerprint[:16]}-T{seq_len}"


def _cache_files(cache_dir: Path, split: str) -> dict[str, Path]:
    return {name: cache_dir / f"{split}.{name}.bin" for name in ("top1", "topk_ids", "topk_logits")}


def read_teacher_cache(cache_dir: str | Path, split: str = "train") -> tuple[dict, dict[str, np.ndarray]]:
    """``(meta, arrays)`` of a finished cache: ``top1`` (count,) uint32 and, with ``top_k``,
    ``topk_ids`` (count, k) uint32 and ``topk_logits`` (count, k) float16 (memory-mapped).

    Raises:
        FileNotFoundError: no finished cache there (``meta.json`` is written last).
    """
    cache_dir = Path(cache_dir)
    meta_path = cache_dir / f"{split}.meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no teacher-label cache at {cache_dir} (missing {meta_path.name}); "
                                f"build it with mmafm.train.distill.build_teacher_cache")
    meta = json.loads(meta_path.read_text())
    files = _cache_files(cache_dir, split)
    count, top_k = int(meta["count"]), int(meta["top_k"])
    arrays = {"top1": np.memmap(files["top1"], dtype=np.uint32, mode="r", shape=(count,))}
    if top_k:
        arrays["topk_ids"] = np.memmap(files["topk_ids"], dtype=np.uint32, mode="r", shape=(count, top_k))
        arrays["topk_logits"] = np.memmap(files["topk_logits"], dtype=np.float16, mode="r", shape=(count, top_k))
    return meta, arrays


@torch.no_grad()
def build_teacher_cache(
    teacher: nn.Module,
    tokens_dir: str | Path,
    seq_len: int,
    cache_dir: str | Path | None = None,
    top_k: int = 0,
    batch_size: int = 16,
    split: str = "train",
    device: str | torch.device = "cpu",
    cache_root: str | Path | None = None,
) -> Path:
    """Run ``teacher`` once over every training window of ``<tokens_dir>/<split>.bin`` and store
    its top-1 per token (uint32, 4 bytes) and, with ``top_k > 0``, its top-k ids and logits.

    Entry ``p`` holds the teacher's prediction of token ``p + 1`` from the window that contains
    ``p`` (windows of ``seq_len`` tokens from ``w * seq_len``, as :class:`TokenShards` cuts them);
    positions no window covers hold :data:`UNSET`. A finished cache for the same teacher,
    ``seq_len``, token file and at least ``top_k`` is reused as is ("written once").

    Where: ``cache_dir`` itself, else ``default_cache_dir(cache_root, teacher fingerprint,
    seq_len)``; ``tokens_dir`` is only read. Every file is written atomically and ``meta.json``
    last (a stale one is removed before a rebuild), so a reader sees a whole cache or none.

    Returns:
        The cache folder.

    Raises:
        ValueError: neither ``cache_dir`` nor ``cache_root`` given, or the cache would lie inside
            ``tokens_dir`` (an earlier stage's output).
    """
    from mmafm.data.shards import TOKEN_DTYPE
    from mmafm.io import atomic_path, atomic_write_json

    source = Path(tokens_dir) / f"{split}.bin"
    if not source.is_file():
        raise FileNotFoundError(f"token shard not found: {source} (run the 00_data stage)")
    if not cache_dir and not cache_root:
        raise ValueError("build_teacher_cache: pass cache_dir or cache_root (a folder of the distilling run); "
                         f"the token folder {tokens_dir} is the data stage's output and is not written")
    fingerprint = teacher_fingerprint(teacher)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(cache_root, fingerprint, seq_len)
    if cache_dir.resolve().is_relative_to(Path(tokens_dir).resolve()):
        raise ValueError(f"teacher cache {cache_dir} lies inside the token folder {tokens_dir} (an earlier "
                         f"stage's output, only read); put it in the distilling run's own folder")
    try:
        meta, _ = read_teacher_cache(cache_dir, split)
        if meta["teacher"] == fingerprint and meta["seq_len"] == seq_len and meta["top_k"] >= top_k \
                and meta["version"] == CACHE_VERSION and meta["tokens"] == str(source.resolve()) and meta["count"] == \
                source.stat().st_size // np.dtype(TOKEN_DTYPE).itemsize:
            return cache_dir
    except FileNotFoundError:
        pass
    (cache_dir / f"{split}.meta.json").unlink(missing_ok=True)  # a rebuild: no meta until the new files are whole
    tokens = np.memmap(source, dtype=TOKEN_DTYPE, mode="r") if source.stat().st_size else np.zeros(0, TOKEN_DTYPE)
    count, windows = len(tokens), max(0, (len(tokens) - 1) // seq_len)
    teacher = teacher.to(device).eval()
    files = _cache_files(cache_dir, split)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        temps = {name: stack.enter_context(atomic_path(path)) for name, path in files.items()
                 if name == "top1" or top_k}
        top1 = np.memmap(temps["top1"], dtype=np.uint32, mode="w+", shape=(max(count, 1),))
        top1[:] = UNSET
        if top_k:
            ids = np.memmap(temps["topk_ids"], dtype=np.uint32, mode="w+", shape=(max(count, 1), top_k))
            logits_out = np.memmap(temps["topk_logits"], dtype=np.float16, mode="w+", shape=(max(count, 1), top_k))
        offsets = np.arange(seq_len)
        for start in tqdm(range(0, windows, batch_size), desc="teacher labels", unit="batch", mininterval=10,
                          disable=windows <= batch_size * 4):
            rows = np.arange(start, min(start + batch_size, windows))[:, None] * seq_len + offsets  # (B, T)
            input_ids = torch.from_numpy(np.asarray(tokens[rows], dtype=np.int64)).to(device)
            logits = teacher(input_ids).float()  # (B, T, V)
            flat = rows.reshape(-1)
            top1[flat] = logits.argmax(-1).reshape(-1).cpu().numpy().astype(np.uint32)
            if top_k:
                values, indices = logits.topk(top_k, dim=-1)
                ids[flat] = indices.reshape(-1, top_k).cpu().numpy().astype(np.uint32)
                logits_out[flat] = values.reshape(-1, top_k).cpu().numpy().astype(np.float16)
        for array in [top1] + ([ids, logits_out] if top_k else []):
            array.flush()
        del top1
        if top_k:
            del ids, logits_out
    atomic_write_json(cache_dir / f"{split}.meta.json", {
        "version": CACHE_VERSION, "teacher": fingerprint, "seq_len": seq_len, "top_k": top_k, "count": count,
        "split": split, "tokens": str(source.resolve()), "windows": windows, "bytes_per_token": 4 + top_k * 6,
    })
    return cache_dir


class TeacherLabelShards:
    """:class:`~mmafm.data.shards.TokenShards` batches with the cached teacher labels aligned:
    ``(input_ids, targets, teacher_top1)`` (B, T) each, or, with ``use_topk``,
    ``(input_ids, targets, topk_ids (B, T, k), topk_logits (B, T, k))``.

    The order, epochs and rank split are exactly those of the token shards it wraps.
    """

    def __init__(self, shards: Any, cache_dir: str | Path, use_topk: bool = False):
        meta, self.arrays = read_teacher_cache(cache_dir, shards.path.stem)
        if meta["seq_len"] != shards.seq_len:
            raise ValueError(f"teacher cache {cache_dir} was made for seq_len={meta['seq_len']}, "
                             f"the shards cut seq_len={shards.seq_len}")
        if meta["count"] != len(shards.tokens):
            raise ValueError(f"teacher cache {cache_dir} covers {meta['count']} tokens, {shards.path} holds "
                             f"{len(shards.tokens)}: the cache belongs to other shards")
        if use_topk and not meta["top_k"]:
            raise ValueError(f"teacher cache {cache_dir} holds no top-k logits (built with top_k=0)")
        self.shards, self.use_topk = shards, use_topk

    def set_epoch(self, epoch: int) -> None:
        self.shards.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.shards)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        seq_len = self.shards.seq_len
        offsets = np.arange(seq_len + 1)
        for windows in self.shards._batches():
            positions = windows[:, None] * seq_len + offsets  # (B, T + 1)
            rows = torch.from_numpy(np.asarray(self.shards.tokens[positions], dtype=np.int64))
            inputs = positions[:, :-1]
            if self.use_topk:
                yield (rows[:, :-1], rows[:, 1:],
                       torch.from_numpy(np.asarray(self.arrays["topk_ids"][inputs], dtype=np.int64)),
                       torch.from_numpy(np.asarray(self.arrays["topk_logits"][inputs], dtype=np.float32)))
            else:
                yield rows[:, :-1], rows[:, 1:], torch.from_numpy(np.asarray(self.arrays["top1"][inputs], dtype=np.int64))


# ----------------------------------------------------------------------------------- the task
class DistillTask:
    """Next-token training with a distillation target, for the shared trainer.

    Batches: ``(input_ids, targets)`` (the teacher runs online), ``(input_ids, targets,
    teacher_top1)`` or ``(input_ids, targets, topk_ids, topk_logits)`` (from the cache). The
    loss is the model's own (CE + z-loss + MoE balance) with its CE part replaced by the mix:
    ``loss = model_loss + weight * (distill - CE)``, so ``weight = 0`` is exactly the plain loss.

    Args:
        model: the student (``forward``, ``loss``, ``output_weight``; possibly wrapped).
        val_batches: held-out ``(input_ids, targets)`` batches.
        teacher: the frozen teacher, needed for online batches.
        weight: weight of the teacher term [paper: 0.9].
        loss: "top1" (the 2024 target) or "kl" (forward KL at ``temperature``).
        temperature: softmax temperature of the KL.
        chunk_size: vocabulary chunk of the online KL.
    """

    def __init__(self, model: nn.Module, val_batches: list, teacher: nn.Module | None = None, weight: float = 0.9,
                 loss: str = "top1", temperature: float = 1.0, chunk_size: int = 4096):
        if loss not in DISTILL_LOSSES:
            raise ValueError(f"distillation loss must be one of {DISTILL_LOSSES}, got {loss!r}")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"distillation weight must be in [0, 1], got {weight}")
        self.model, self.val_batches, self.teacher = model, val_batches, teacher
        self.weight, self.loss, self.temperature, self.chunk_size = weight, loss, temperature, chunk_size
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    @property
    def decoder(self) -> nn.Module:
        return getattr(self.model, "module", self.model)

    def _teacher(self, device: torch.device) -> nn.Module:
        if self.teacher is None:
            raise ValueError("this batch has no cached teacher labels and the task has no teacher to run")
        return self.teacher.to(device)

    def training_forward(self, batch: tuple[torch.Tensor, ...]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        input_ids, targets = batch[0], batch[1]  # (B, T), (B, T)
        decoder = self.decoder
        keep = targets != -100
        if self.loss == "kl" and len(batch) == 2:  # online teacher: full distributions, chunked
            hidden = self.model(input_ids, return_hidden=True)  # (B, T, d)
            logits = decoder.logits(hidden)  # (B, T, V)
            with torch.no_grad():
                teacher = self._teacher(input_ids.device)
                teacher_hidden = teacher(input_ids, return_hidden=True)
            distill = chunked_forward_kl(hidden, decoder.output_weight(), teacher_hidden, teacher.output_weight(),
                                         self.temperature, keep, self.chunk_size)
        else:
            logits = self.model(input_ids)  # (B, T, V)
            if self.loss == "kl":  # cached top-k logits
                distill = topk_forward_kl(logits, batch[2], batch[3], self.temperature, keep)
            else:
                if len(batch) == 3:
                    teacher_top1 = batch[2].clone()
                    teacher_top1[teacher_top1 == int(UNSET)] = -100
                else:
                    with torch.no_grad():
                        teacher_top1 = self._teacher(input_ids.device)(input_ids).argmax(-1)
                distill = top1_distillation_loss(logits, targets, teacher_top1, weight=1.0)
        total, metrics = decoder.loss(logits, targets)
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        metrics["distill"] = distill.item()
        return {"lm": total + self.weight * (distill - ce)}, metrics

    def count_items(self, batch: tuple[torch.Tensor, ...]) -> int:
        return batch[0].numel()

    def evaluate(self) -> dict[str, float]:
        """Held-out cross-entropy against the true tokens and its perplexity."""
        from mmafm.eval.perplexity import held_out_perplexity

        device = next(self.decoder.parameters()).device
        return held_out_perplexity(self.model, self.val_batches, device)


# ----------------------------------------------------------------------------------- teacher cost
def train_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: ``3 x forward``, forward = ``2 x`` the matmul parameters a token
    uses (MoE layers: the router and ``top_k`` experts; the tied embedding once, as the output
    head) ``+ 2 x n_layers x n_heads x head_dim x (seq_len + 1)`` for causal attention scores and
    values (Kaplan et al. 2020's ``6N`` plus the attention term; norms are ignored)."""
    config = model.config
    matmul = model.num_active_params() - sum(p.numel() for p in model.parameters() if p.ndim < 2)
    attention = 2 * config.n_layers * config.n_heads * config.head_dim * (min(seq_len, config.max_seq_len) + 1)
    return 3.0 * (2.0 * matmul + attention)


def upcycled_teacher(dense: nn.Module, num_experts: int = 64, top_k: int = 2, moe_every: int = 2) -> nn.Module:
    """The 2025 MoE teacher: ``dense`` sparse-upcycled to ``num_experts`` copies of its FFN every
    ``moe_every`` layers (:func:`mmafm.models.text.upcycle`; 2025 report: ~3B dense -> 64 experts
    every 2 layers, trained on a little high-quality text, teacher cost -90%). Same logits as
    ``dense`` until trained; saves and loads like any text model."""
    from mmafm.models.text import upcycle

    return upcycle(dense, num_experts=num_experts, top_k=top_k, moe_every=moe_every)


# ----------------------------------------------------------------------------------- 02's fields
def distill_training_kwargs(cfg: Any, cache_root: str | Path | None = None) -> dict[str, Any]:
    """What ``02_text_pretrain`` passes to its trainer when ``cfg.distill_from`` names a teacher:
    the :class:`DistillTask` factory and, for the cached targets, :class:`TeacherLabelShards`
    over a cache in ``cache_root`` (default ``<cfg.out_dir>/teacher_cache``; one folder per
    teacher fingerprint, :func:`default_cache_dir`). ``{}`` when there is no teacher (the stage's
    plain training)."""
    if not cfg.distill_from:
        return {}
    from mmafm.checkpoint import load_model
    from mmafm.data.shards import TokenShards

    from mmafm.data.shards import read_token_meta

    teacher = load_model(cfg.distill_from, family=("text", "ptmoe"), dtype=torch.float32)
    vocab = int(read_token_meta(cfg.tokens_dir)["vocab_size"])
    if teacher.config.vocab_size != vocab:
        raise ValueError(f"distill_from {cfg.distill_from}: the teacher has a {teacher.config.vocab_size}-token "
                         f"vocabulary, the tokens in {cfg.tokens_dir} {vocab}; distil from a teacher trained "
                         f"with the same tokenizer")
    online = cfg.distill_loss == "kl" and cfg.distill_top_k == 0
    kwargs: dict[str, Any] = {"task_cls": functools.partial(
        DistillTask, teacher=teacher, weight=cfg.distill_weight, loss=cfg.distill_loss,
        temperature=cfg.distill_temperature)}
    if not online:
        top_k = cfg.distill_top_k if cfg.distill_loss == "kl" else 0
        cache = build_teacher_cache(teacher, cfg.tokens_dir, cfg.seq_len, top_k=top_k, batch_size=cfg.batch_size,
                                    cache_root=cache_root or Path(cfg.out_dir) / "teacher_cache")
        shards = TokenShards(cfg.tokens_dir, cfg.seq_len, cfg.batch_size, seed=cfg.seed, split="train")
        kwargs["train_data"] = TeacherLabelShards(shards, cache, use_topk=top_k > 0)
    return kwargs


def bytes_per_token(top_k: int = 0) -> int:
    """Cache size per training token: 4 bytes of top-1 plus ``top_k`` x (4-byte id + 2-byte logit)."""
    return 4 + 6 * top_k
