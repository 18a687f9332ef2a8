"""Adapter sizes as the reports quote them, computed from the full-size configs on the meta device.

2024: rank 16 on every attention and FFN projection of the on-device model, 16-bit parameters,
"tens of MB" [paper]; 2025: rank-32 adapters from the toolkit over the on-device model, whose
KV-shared segment has Q and O projections only [paper + teardown] (WAVE2.md "Adapters").
``python -c "from mmafm.lora.sizes import adapter_size_table; print(adapter_size_table())"``
prints the table of README.md and docs/adapters.md.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from mmafm.lora.adapters import target_modules

__all__ = ["REPORT_SIZES", "adapter_size", "adapter_size_table"]

# (preset, rank) pairs the reports speak of
REPORT_SIZES = (("afm_2024_device", 16), ("afm_2025_device", 8), ("afm_2025_device", 16), ("afm_2025_device", 32))


def adapter_size(model: nn.Module | str, rank: int, targets: Sequence[str] | None = None, bits: int = 16) -> dict:
    """Parameters and bytes of one LoRA adapter of ``rank`` over ``model`` (a module or a preset
    name, built on the meta device): ``rank * (in + out)`` per targeted linear.

    Returns:
        ``{"preset", "rank", "modules", "parameters", "bytes", "megabytes"}`` (MB = 10^6 bytes,
        at ``bits`` per parameter).
    """
    preset = model if isinstance(model, str) else getattr(getattr(model, "model_spec", None), "preset", None)
    if isinstance(model, str):
        from mmafm.registry import create_model

        model = create_model(model, device="meta")
    names = target_modules(model, targets)
    parameters = 0
    for name in names:
        linear = model.get_submodule(name)
        parameters += rank * (linear.in_features + linear.out_features)
    size_bytes = parameters * bits // 8
    return {"preset": preset, "rank": rank, "modules": len(names), "parameters": parameters,
            "bytes": size_bytes, "megabytes": size_bytes / 1e6}


def adapter_size_table(rows: Sequence[tuple[str, int]] = REPORT_SIZES, bits: int = 16) -> str:
    """A markdown table of :func:`adapter_size` for ``(preset, rank)`` rows."""
    lines = ["| base | rank | LoRA linears | parameters | MB at 16 bits |" if bits == 16 else
             f"| base | rank | LoRA linears | parameters | MB at {bits} bits |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for preset, rank in rows:
        size = adapter_size(preset, rank, bits=bits)
        lines.append(f"| `{preset}` | {rank} | {size['modules']} | {size['parameters']:,} | {size['megabytes']:.1f} |")
    return "\n".join(lines)
