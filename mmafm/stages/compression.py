"""Stage 11: compress the text base (palettization, 2-bit QAT) and recover accuracy with LoRA.

The reports fit their models on device by compressing the weights and then training low-rank
accuracy-recovery adapters over the frozen compressed base (WAVE2.md "Compression"; 2024:
palettization at 4 / 2 bits with a rank-16 recovery LoRA, "more aggressive compression, more
recovered"; 2025: 2-bit QAT with a learnable clip and a jointly trained 4-bit embedding). For
each scheme of ``schemes`` this stage

1. loads 02_text_pretrain's ``checkpoint`` and compresses it: ``palettize4`` / ``palettize2``
   (k-means LUTs per 16 rows, the embedding per channel at ``embedding_bits``, post-training), or
   ``qat2`` / ``qat4`` (``qat_steps`` of quantization-aware training on the pretraining tokens,
   the embedding at ``qat_embedding_bits`` trained jointly, then packed), ``mixed`` (4- and 2-bit
   LUTs allocated per layer to ``mixed_bpw`` by loss sensitivity on a training batch; the
   per-layer table goes to ``allocation.md``) or ``astc`` (ASTC-style 6x6 blocks, 3.5556 bpw, the
   embedding at ``qat_embedding_bits`` post-training, as the 2025 server);
2. saves the compressed checkpoint (packed codes + tables; ``mmafm.load_model`` reads it back)
   and measures its bits per weight and held-out loss;
3. trains a rank-``rank`` LoRA over the frozen compressed base (its dequantized weights, bitwise
   the packed ones) on the same pretraining tokens, and measures the loss again: the share of
   the float-to-compressed loss gap the adapter closes ("no gap to close" when the compressed
   model is not worse than the float one). The adapter is kept only if it lowers the held-out
   loss on selection batches disjoint from the reported ones (``{scheme}_recovery_kept``): a
   recovery that makes the model worse is reported and dropped, not shipped silently;
4. plots loss against bits per weight before and after recovery, and the recovery curves.

>>> mmafm run 11_compression -p checkpoint=runs/tiny/02_text_pretrain -p tokens_dir=runs/tiny/00_data/tokens
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmafm.config import ConfigError
from mmafm.io import atomic_write_text
from mmafm.stages import register_stage
from mmafm.stages.base import StageDir, TrainStageConfig, require_inputs
from mmafm.train.trainer import setting

__all__ = ["CompressionStageConfig", "SCHEME_NAMES", "describe_recovery", "gap_closed", "parse_scheme", "run"]

STAGE = "11_compression"
SCHEME_NAMES = ("palettize4", "palettize2", "qat2", "qat4", "mixed", "astc")


@dataclass
class CompressionStageConfig(TrainStageConfig):
    """Compression + accuracy recovery of the text base. Defaults: the tiny pipeline (< 60 s on
    2 idle cores). The trainer's settings apply to each recovery adapter."""

    # --- inputs (a pipeline wires them)
    checkpoint: str = ""  # the float base: 02_text_pretrain's `checkpoint` (or its stage folder)
    tokens_dir: str = field(default="", metadata={"path": "dir"})  # 00_data's `tokens_dir`: the pretraining mixture
    tokenizer: str = ""  # 00_data's `tokenizer` (recorded in the compressed checkpoints; "" = none)
    # --- compression
    schemes: str = "palettize4,palettize2,qat2"  # comma-separated, from SCHEME_NAMES, in any order
    group_size: int = field(default=16, metadata={"min": 1})  # rows sharing one LUT [paper: 16]
    # palettize / mixed schemes: an fp16 scale per row before the shared LUT (coremltools'
    # enable_per_channel_scale; +16 bits a row) [open: the reports do not mention one; off = the
    # 2024 scheme as described; on SmolLM2 4-bit it halves perplexity, docs/compression.md]
    per_channel_scale: bool = False
    embedding_bits: int = field(default=8, metadata={"choices": (4, 8)})  # palettize schemes' embedding [paper 2024: 8-bit per channel]
    qat_embedding_bits: int = field(default=4, metadata={"choices": (4, 8)})  # QAT schemes' embedding, trained jointly [paper 2025: 4-bit]
    qat_steps: int = field(default=24, metadata={"min": 1})  # quantization-aware training steps [open; the reports train far longer]
    qat_lr: float = field(default=1e-3, metadata={"min": 0.0})  # QAT peak LR (weights and clips) [open]
    mixed_bpw: float = field(default=3.5, metadata={"min": 2.0})  # budget of the `mixed` scheme over the linears [paper 2024: 3.5 possible, 3.7 shipped]
    # --- recovery LoRA and data
    rank: int = field(default=16, metadata={"min": 1})  # [paper 2024: rank-16 accuracy-recovery adapters]
    alpha: float = field(default=16.0, metadata={"min": 0.0})  # scale = alpha / rank [open]
    seq_len: int = field(default=64, metadata={"min": 2})  # tokens per training / held-out row (tiny: 64, a minute)
    batch_size: int = field(default=4, metadata={"min": 1})  # rows per step (tiny: 4, a minute)
    eval_batches: int = field(default=2, metadata={"min": 1})  # held-out batches per loss measurement
    max_steps: int = setting("max_steps", 24)  # recovery steps per scheme [paper: ~10B tokens at full size]
    lr: float = setting("lr", 3e-3)  # recovery LoRA peak LR [open]
    weight_decay: float = setting("weight_decay", 0.0)
    warmup_steps: int = setting("warmup_steps", 4)
    min_lr_ratio: float = setting("min_lr_ratio", 0.1)
    ckpt_every: int = setting("ckpt_every", 0)  # short runs: final checkpoint only
    log_every: int = setting("log_every", 5)
    eval_every: int = setting("eval_every", 0)


def parse_scheme(name: str) -> tuple[str, int]:
    """``(method, bits)`` of a scheme name: ``palettize4`` -> ``("palettize", 4)``; ``mixed`` and
    ``astc`` have no single bit width (0)."""
    if name not in SCHEME_NAMES:
        raise ConfigError(f"{STAGE}: unknown scheme {name!r}; choose from {', '.join(SCHEME_NAMES)}")
    method = name.rstrip("0123456789")
    return method, int(name[len(method):] or 0)


def gap_closed(float_loss: float, loss_compressed: float, loss_recovered: float) -> float | None:
    """Share of the float-to-compressed held-out loss gap that recovery closes (1 = back to the
    float loss, negative = recovery made it worse); ``None`` when there is no gap to close (the
    compressed model is not worse than the float one), where a ratio would divide by <= 0."""
    gap = loss_compressed - float_loss
    return (loss_compressed - loss_recovered) / gap if gap > 0 else None


def describe_recovery(float_loss: float, loss_compressed: float, loss_trained: float, kept: bool) -> str:
    """One line for the stage log: the recovery's effect on the gap in words, never ``nan``.

    Args:
        float_loss: held-out loss of the float base.
        loss_compressed: held-out loss of the compressed base without an adapter.
        loss_trained: held-out loss with the trained recovery adapter.
        kept: whether the adapter was kept (it lowered the loss on the selection batches).
    """
    closed = gap_closed(float_loss, loss_compressed, loss_trained)
    effect = ("no gap to close: the compressed loss is not above the float loss" if closed is None
              else f"{closed:.0%} of the gap closed")
    if kept:
        return f"recovered {loss_trained:.4f}, {effect}"
    return (f"recovery adapter not kept ({loss_trained:.4f} with it, {effect}; it did not lower the "
            f"selection loss), the compressed model stands")


def _schemes(cfg: CompressionStageConfig) -> list[str]:
    names = [n.strip() for n in cfg.schemes.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"{STAGE}: schemes is empty; choose from {', '.join(SCHEME_NAMES)}")
    for name in names:
        parse_scheme(name)
    return names


class _LMTask:
    """Next-token loss on token windows for the shared trainer (QAT and recovery)."""

    def __init__(self, model: nn.Module, val_batches: list):
        self.model, self.val_batches = model, val_batches

    def training_forward(self, batch):
        input_ids, targets = batch  # (B, T), (B, T)
        loss, metrics = self.model.loss(self.model(input_ids), targets)
        return {"lm": loss}, metrics

    def count_items(self, batch) -> int:
        return batch[0].numel()

    def evaluate(self) -> dict[str, float]:
        return _held_out(self.model, self.val_batches)


@torch.no_grad()
def _held_out(model: nn.Module, batches: list) -> dict[str, float]:
    from mmafm.eval.perplexity import held_out_perplexity

    was_training = model.training
    model.eval()
    result = held_out_perplexity(model, batches, torch.device("cpu"))
    model.train(was_training)
    return result


def _train(cfg: CompressionStageConfig, model: nn.Module, val_batches: list, folder: StageDir,
           **fixed: Any) -> list[dict]:
    from mmafm.data.shards import TokenShards
    from mmafm.train import Trainer, seed_everything

    seed_everything(cfg.seed)
    shards = TokenShards(cfg.tokens_dir, cfg.seq_len, cfg.batch_size, seed=cfg.seed, split="train")
    trainer = Trainer(_LMTask(model, val_batches), shards, cfg.train_config(**fixed), folder)
    records = trainer.fit()
    model.eval()
    return records


def _held_out_split(cfg: CompressionStageConfig) -> tuple[list, list]:
    """The reported held-out batches (the first ``eval_batches`` of val) and the batches that pick
    whether a recovery adapter is kept (the next ``eval_batches``), so the reported loss is not the
    one the choice was made on. A val split too small for both selects on the reported batches."""
    from mmafm.stages.text_pretrain import held_out_batches

    batches = held_out_batches(cfg.tokens_dir, cfg.seq_len, cfg.batch_size, 2 * cfg.eval_batches)
    reported, selection = batches[:cfg.eval_batches], batches[cfg.eval_batches:]
    if not selection:
        print(f"[{STAGE}] val split holds {len(batches)} batch(es): the recovery adapters are kept or dropped "
              "by the reported held-out batches")
        selection = reported
    return reported, selection


def _compress(cfg: CompressionStageConfig, scheme: str, val_batches: list, stage_dir: StageDir) -> tuple[nn.Module, list]:
    """The base compressed by ``scheme`` (packed modules) and the QAT records (empty for PTQ)."""
    from mmafm.checkpoint import load_model
    from mmafm.compress import compress_model, convert_qat, prepare_qat

    method, bits = parse_scheme(scheme)
    model = load_model(cfg.checkpoint, family="text")
    if method == "palettize":
        compress_model(model, bits=bits, group_size=cfg.group_size, embedding_bits=cfg.embedding_bits,
                       per_channel_scale=cfg.per_channel_scale)
        return model, []
    if method == "astc":
        from mmafm.compress.palettize import astc_compress

        astc_compress(model)
        compress_model(model, bits={}, embedding_bits=cfg.qat_embedding_bits)  # the embedding only
        return model, []
    if method == "mixed":
        from mmafm.compress.allocate import allocate_bits, allocation_table, layer_sensitivity
        from mmafm.data.shards import TokenShards

        calibration = [next(iter(TokenShards(cfg.tokens_dir, cfg.seq_len, cfg.batch_size, seed=cfg.seed, split="train")))]
        table = layer_sensitivity(model, calibration, options=(4, 2), group_size=cfg.group_size)
        allocation = allocate_bits(table, cfg.mixed_bpw)
        atomic_write_text(stage_dir.root / "allocation.md", allocation_table(table, allocation) + "\n")
        compress_model(model, bits=allocation, group_size=cfg.group_size, embedding_bits=cfg.embedding_bits,
                       per_channel_scale=cfg.per_channel_scale)
        return model, []
    prepare_qat(model, bits=bits, embedding_bits=cfg.qat_embedding_bits)
    folder = StageDir(stage_dir.root / "qat" / scheme, f"{STAGE}/qat/{scheme}")
    records = _train(cfg, model, val_batches, folder, max_steps=cfg.qat_steps, lr=cfg.qat_lr,
                     warmup_steps=min(cfg.warmup_steps, cfg.qat_steps - 1), weight_decay=0.0,
                     eval_every=cfg.qat_steps)
    convert_qat(model)
    return model, records


def _figures(stage_dir: StageDir, float_loss: float, rows: list[dict], curves: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.axhline(float_loss, color="black", linestyle="--", label="float base")
    for row in rows:
        x = row["bpw"]
        left.annotate("", (x, row["loss_recovered"]), (x, row["loss_compressed"]),
                      arrowprops={"arrowstyle": "->", "color": "gray"})
        left.plot([x], [row["loss_compressed"]], "o", color="tab:red")
        left.plot([x], [row["loss_recovered"]], "s", color="tab:green")
        closed = "no gap" if row["gap_closed"] is None else f"{row['gap_closed']:.0%} closed"
        if not row["recovery_kept"]:
            left.plot([x], [row["loss_trained"]], "x", color="tab:gray")
            closed += " (not kept)"
        left.annotate(f"{row['scheme']}\n{closed}", (x, row["loss_compressed"]),
                      textcoords="offset points", xytext=(6, 4), fontsize=8)
    left.plot([], [], "o", color="tab:red", label="compressed")
    left.plot([], [], "s", color="tab:green", label="+ recovery LoRA (the kept model)")
    if any(not row["recovery_kept"] for row in rows):
        left.plot([], [], "x", color="tab:gray", label="recovery LoRA not kept (worse)")
    left.set(xlabel="bits per weight (embedding included)", ylabel="held-out loss (nats / token)",
             title="compression and accuracy recovery")
    left.legend(fontsize=8)
    for scheme, records in curves.items():
        train = [r for r in records if "ce" in r]
        right.plot([r["step"] for r in train], [r["ce"] for r in train], label=scheme)
    right.axhline(float_loss, color="black", linestyle="--", label="float base (held out)")
    right.set(xlabel="recovery step", ylabel="training loss", title="recovery LoRA over the frozen compressed base")
    right.legend(fontsize=8)
    stage_dir.save_figure(fig, "compression")
    plt.close(fig)


def run(cfg: CompressionStageConfig) -> dict[str, str]:
    """Compress, measure, recover and plot; returns the stage outputs."""
    from mmafm.checkpoint import load_model
    from mmafm.compress import bits_per_weight, dequantized_copy, save_compressed
    from mmafm.compress.bits import matrix_bits
    from mmafm.lora import attach_lora

    require_inputs(cfg, STAGE, dict.fromkeys(("checkpoint", "tokens_dir"), "02_text_pretrain's `checkpoint` and 00_data's "
                                             "`tokens_dir` (configs/pipelines/tiny.yaml wires them)"))
    if cfg.parallel != "none":
        raise ConfigError(f"{STAGE}: parallel={cfg.parallel!r}; this stage trains in one process (parallel=none)")
    schemes = _schemes(cfg)
    start = time.time()
    stage_dir = StageDir(cfg.out_dir, STAGE)
    base = load_model(cfg.checkpoint, family="text")
    if cfg.seq_len > base.config.max_seq_len:
        raise ConfigError(f"{STAGE}: seq_len={cfg.seq_len} > the base's max_seq_len={base.config.max_seq_len}")
    val_batches, selection_batches = _held_out_split(cfg)
    float_loss = _held_out(base, val_batches)["val_loss"]
    float_bpw = bits_per_weight(base)
    metadata = {"tokenizer": cfg.tokenizer} if cfg.tokenizer else {}

    rows, curves, outputs = [], {}, {}
    for scheme in schemes:
        compressed, qat_records = _compress(cfg, scheme, val_batches, stage_dir)
        loss_compressed = _held_out(compressed, val_batches)["val_loss"]
        path = save_compressed(stage_dir.root / "compressed" / scheme, compressed, {**metadata, "scheme": scheme})
        outputs[f"compressed_{scheme}"] = str(path)
        bpw, bpw_body = bits_per_weight(compressed), bits_per_weight(compressed, include_embedding=False)
        megabytes = sum(bits for _, _, bits in matrix_bits(compressed)) / 8 / 1e6
        # recovery: LoRA over the frozen base, whose dequantized weights are the packed ones
        plain = dequantized_copy(compressed)
        adapters = attach_lora(plain, cfg.rank, cfg.alpha, slots=1, name=scheme, seed=cfg.seed)
        folder = StageDir(stage_dir.root / "recovery" / scheme, f"{STAGE}/recovery/{scheme}")
        selection_before = _held_out(plain, selection_batches)["val_loss"]  # adapters start at zero
        records = _train(cfg, plain, val_batches, folder)
        curves[scheme] = records
        loss_trained = _held_out(plain, val_batches)["val_loss"]
        # keep the better of before / after on batches the reported losses do not use
        kept = _held_out(plain, selection_batches)["val_loss"] < selection_before
        adapter_path = adapters.save(stage_dir.root / "recovery" / scheme / "adapter", scheme, dtype=torch.bfloat16,
                                     metadata={"stage": STAGE, "scheme": scheme, "compressed": str(path), "kept": kept})
        if kept:  # a dropped adapter stays on disk for inspection but is not an output
            outputs[f"adapter_{scheme}"] = str(adapter_path)
        loss_recovered = loss_trained if kept else loss_compressed  # the model the stage hands on
        row = {"scheme": scheme, "bpw": bpw, "bpw_without_embedding": bpw_body, "megabytes": megabytes,
               "loss_compressed": loss_compressed, "loss_recovered": loss_recovered, "loss_trained": loss_trained,
               "recovery_kept": kept, "gap_closed": gap_closed(float_loss, loss_compressed, loss_recovered),
               "qat_final_loss": next((r["ce"] for r in reversed(qat_records) if "ce" in r), None),
               "file_bytes": path.stat().st_size}
        rows.append(row)
        stage_dir.log({"scheme": scheme, **{k: v for k, v in row.items() if k != "scheme"}})
        print(f"[{STAGE}] {scheme}: {bpw:.3f} bpw, loss {float_loss:.4f} (float) -> {loss_compressed:.4f} "
              f"(compressed) -> {describe_recovery(float_loss, loss_compressed, loss_trained, kept)}")
    _figures(stage_dir, float_loss, rows, curves)
    summary: dict[str, Any] = {"float_loss": round(float_loss, 4), "float_bpw": float_bpw}
    for row in rows:
        scheme = row["scheme"]
        summary.update({
            f"{scheme}_bpw": round(row["bpw"], 4), f"{scheme}_bpw_without_embedding": round(row["bpw_without_embedding"], 4),
            f"{scheme}_loss": round(row["loss_compressed"], 4), f"{scheme}_loss_recovered": round(row["loss_recovered"], 4),
            f"{scheme}_gap_closed": None if row["gap_closed"] is None else round(row["gap_closed"], 4),
            f"{scheme}_loss_trained": round(row["loss_trained"], 4), f"{scheme}_recovery_kept": row["recovery_kept"],
            f"{scheme}_file_bytes": row["file_bytes"],
        })
    summary.update({"rank": cfg.rank, "recovery_steps": cfg.max_steps, "qat_steps": cfg.qat_steps,
                    "seconds": round(time.time() - start, 1)})
    outputs.update({"base_checkpoint": cfg.checkpoint})
    if cfg.tokenizer:
        outputs["tokenizer"] = cfg.tokenizer
    stage_dir.write_manifest(outputs, cfg, summary)
    return outputs


register_stage(STAGE, CompressionStageConfig, run)
