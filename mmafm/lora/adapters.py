"""Attach LoRA adapters to any registered model and drive them: slots, swaps, mixed batches, merges.

The reports specialise one frozen base for many features with runtime-swappable LoRA adapters
(WAVE2.md "Adapters": 2024, rank 16 on every attention and FFN projection, 16-bit, "tens of MB",
loaded, cached and swapped at run time; 2025, a toolkit training rank-32 / alpha-16 adapters).
:func:`attach_lora` replaces each targeted ``nn.Linear`` of a model by a
:class:`~mmafm.layers.lora.LoRALinear` holding ``slots`` adapters at once, freezes everything
else, and returns an :class:`Adapters` handle:

>>> adapters = attach_lora(model, rank=16, alpha=16, slots=4)   # adapter "default", trainable
>>> adapters.load("runs/x/10_adapter/adapters/date_place")      # into a free slot
>>> adapters.set_adapter("date_place")                           # a buffer fill: no rebuild
>>> with adapters.mixed(["default", "date_place", None]):        # one adapter per batch row
...     logits = model(ids)                                       # ids (3, T)

No model file knows about any of this (the modules are swapped in place), and the inference
plan runs a LoRA linear with one adapter in the native kernels on its merged weight
(:mod:`mmafm.inference.plan`). Targets are patterns over module names (see
:func:`target_modules`); the default covers every attention and FFN linear of the text
decoders, the vision towers and the vision-language adapter block, which for the KV-shared
segment of ``afm_2025_device`` is Q and O only (those layers have no K/V projections).
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from mmafm.layers.lora import AdapterRouting, LoRALinear

__all__ = [
    "DEFAULT_TARGETS",
    "AdapterInfo",
    "Adapters",
    "attach_lora",
    "adapters_of",
    "target_modules",
    "matches",
]

# attention and FFN linears of every family: text (q/k/v/o_proj, SwiGLU w_gate/w_up/w_down),
# vision towers and the VL adapter block (timm names qkv/proj, mlp.fc1/fc2) [paper: "all linear
# projections of attention and FFN"]; MoE experts are stacked tensors, not linears, and routers,
# heads and the VL adapter's output projection are left out (name them in `targets` to add them)
DEFAULT_TARGETS = (
    "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
    "ffn.w_gate", "ffn.w_up", "ffn.w_down",
    "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2",
)


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Does module ``name`` match one of ``patterns``? A pattern matches the full name, a
    dotted suffix of it (peft's rule: ``"attn.q_proj"`` matches ``"layers.3.attn.q_proj"``) or,
    as a glob, the full name (``"layers.[0-3].ffn.*"``)."""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _targets(targets: str | Sequence[str] | None) -> tuple[str, ...]:
    if targets is None or targets == "":
        return DEFAULT_TARGETS
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",")]
    patterns = tuple(t for t in targets if t)
    if not patterns:
        raise ValueError(f"LoRA targets {targets!r} hold no pattern")
    return patterns


def target_modules(model: nn.Module, targets: str | Sequence[str] | None = None) -> list[str]:
    """Names of the linears of ``model`` that ``targets`` select (default :data:`DEFAULT_TARGETS`).

    Raises:
        ValueError: no module matches, or a match is not an ``nn.Linear`` (both named).
    """
    patterns = _targets(targets)
    names = []
    for name, module in model.named_modules():
        if not name or not matches(name, patterns):
            continue
        if isinstance(module, LoRALinear):
            raise ValueError(f"module {name!r} already carries LoRA; detach first (Adapters.detach())")
        if not isinstance(module, nn.Linear):
            raise ValueError(f"LoRA target {name!r} is a {type(module).__name__}, not an nn.Linear")
        names.append(name)
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"LoRA targets {list(patterns)} match no linear of {type(model).__name__}; "
                         f"its linears include {linears[:8]}")
    return names


@dataclass
class AdapterInfo:
    """One loaded adapter: where it sits and what it is."""

    name: str
    slot: int
    rank: int  # its own rank (<= the slot rank)
    alpha: float  # scale = alpha / rank
    targets: tuple[str, ...]  # the patterns it was made with
    modules: tuple[str, ...]  # the LoRA modules it covers (the others hold zeros in its slot)
    metadata: dict = field(default_factory=dict)  # what its file said besides (training summary, ...)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class Adapters:
    """The LoRA adapters of one model: ``slots`` fixed slots over the modules :func:`attach_lora`
    replaced. Built by :func:`attach_lora`; also reachable as :func:`adapters_of(model)`.

    Attributes:
        model: the model (its linears replaced in place).
        modules: module name -> :class:`LoRALinear`.
        routing: the shared :class:`~mmafm.layers.lora.AdapterRouting`.
        infos: adapter name -> :class:`AdapterInfo`.
        dropout: LoRA dropout during training.
    """

    def __init__(self, model: nn.Module, modules: dict[str, LoRALinear], routing: AdapterRouting,
                 targets: tuple[str, ...]):
        self.model, self.modules, self.routing, self.targets = model, modules, routing, targets
        self.infos: dict[str, AdapterInfo] = {}
        self.active: str | None = None
        self.merged: str | None = None
        self._fingerprint: dict | None = None

    # ------------------------------------------------------------------ facts

    @property
    def slots(self) -> int:
        return next(iter(self.modules.values())).slots

    @property
    def slot_rank(self) -> int:
        return next(iter(self.modules.values())).rank

    @property
    def dropout(self) -> float:
        return self.routing.dropout

    def names(self) -> list[str]:
        """Loaded adapters, in slot order."""
        return [info.name for info in sorted(self.infos.values(), key=lambda info: info.slot)]

    def info(self, name: str) -> AdapterInfo:
        if name not in self.infos:
            raise KeyError(f"no adapter named {name!r}; loaded: {self.names() or 'none'}")
        return self.infos[name]

    def num_parameters(self, name: str) -> int:
        """Parameters of adapter ``name`` at its own rank: ``rank * (in + out)`` per module."""
        info = self.info(name)
        return sum(info.rank * (self.modules[m].in_features + self.modules[m].out_features) for m in info.modules)

    def fingerprint(self) -> dict:
        """The base model's fingerprint (preset + hash of its weights at 16 bits), computed once
        (at the first call or merge; the base is frozen): see :func:`mmafm.lora.files.base_fingerprint`."""
        if self._fingerprint is None:
            from mmafm.lora.files import base_fingerprint

            self._fingerprint = base_fingerprint(self.model)
        return self._fingerprint

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The stacked ``lora_A`` / ``lora_B`` of every module (the base is frozen)."""
        return [p for module in self.modules.values() for p in (module.lora_A, module.lora_B)]

    # ------------------------------------------------------------------ slots

    def _free_slot(self, name: str) -> int:
        if name in self.infos:
            return self.infos[name].slot
        used = {info.slot for info in self.infos.values()}
        free = [slot for slot in range(self.slots) if slot not in used]
        if not free:
            raise RuntimeError(f"all {self.slots} adapter slots are taken ({', '.join(self.names())}); "
                               f"remove one or attach with more slots")
        return free[0]

    def _covered(self, targets: Sequence[str] | None) -> tuple[str, ...]:
        patterns = self.targets if targets is None else _targets(targets)
        covered = tuple(name for name in self.modules if matches(name, patterns))
        if not covered:
            raise ValueError(f"adapter targets {list(patterns)} match none of the LoRA modules "
                             f"(attached with {list(self.targets)})")
        return covered

    def _set_scale(self, slot: int, scale: float) -> None:
        for module in self.modules.values():
            module.scaling[slot] = scale

    def _check_rank(self, rank: int) -> None:
        if not 1 <= rank <= self.slot_rank:
            raise ValueError(f"adapter rank must be in [1, slot rank {self.slot_rank}], got {rank}")

    def add(self, name: str, rank: int | None = None, alpha: float | None = None,
            targets: Sequence[str] | None = None, seed: int | None = None) -> AdapterInfo:
        """A new trainable adapter in a free slot: ``A`` Kaiming-uniform, ``B`` zero (so the model
        computes the base until it is trained), ``rank`` (default the slot rank) and ``alpha``
        (default the rank: scale 1) on the modules ``targets`` select (default all)."""
        rank = self.slot_rank if rank is None else rank
        self._check_rank(rank)
        alpha = float(rank if alpha is None else alpha)
        slot = self._free_slot(name)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        covered = self._covered(targets)
        for module_name, module in self.modules.items():
            if module_name in covered:
                module.init_slot(slot, rank, generator)
            else:
                module.write_slot(slot, module.lora_A.new_zeros(0, module.in_features),
                                  module.lora_B.new_zeros(module.out_features, 0))
        self._set_scale(slot, alpha / rank)
        info = AdapterInfo(name, slot, rank, alpha, self.targets if targets is None else _targets(targets), covered)
        self.infos[name] = info
        return info

    def put(self, name: str, tensors: dict[str, torch.Tensor], rank: int, alpha: float,
            targets: Sequence[str] | None = None, metadata: dict | None = None) -> AdapterInfo:
        """Write an adapter given as ``{"<module>.lora_A": (r, in), "<module>.lora_B": (out, r)}``
        into its slot (its own slot when ``name`` is loaded: a hot swap in place).

        Raises:
            ValueError: a module it names is not a LoRA module here, or shapes do not fit.
        """
        self._check_rank(rank)
        modules = sorted({key.rsplit(".", 1)[0] for key in tensors})
        unknown = [m for m in modules if m not in self.modules]
        if unknown:
            raise ValueError(f"adapter {name!r} has tensors for {unknown[:4]}, which carry no LoRA here "
                             f"(attached: {len(self.modules)} modules with {list(self.targets)})")
        incomplete = [m for m in modules if f"{m}.lora_A" not in tensors or f"{m}.lora_B" not in tensors]
        if incomplete:
            raise ValueError(f"adapter {name!r} lacks lora_A or lora_B for {incomplete[:4]}")
        if self.merged == name:
            raise RuntimeError(f"adapter {name!r} is merged into the base; unmerge() before replacing it")
        slot = self._free_slot(name)
        for module_name, module in self.modules.items():
            if module_name in modules:
                module.write_slot(slot, tensors[f"{module_name}.lora_A"], tensors[f"{module_name}.lora_B"])
            else:
                module.write_slot(slot, module.lora_A.new_zeros(0, module.in_features),
                                  module.lora_B.new_zeros(module.out_features, 0))
        self._set_scale(slot, float(alpha) / rank)
        info = AdapterInfo(name, slot, rank, float(alpha), self.targets if targets is None else _targets(targets),
                           tuple(modules), dict(metadata or {}))
        self.infos[name] = info
        return info

    def state(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name`` at its own rank: ``{"<module>.lora_A": (r, in), "<module>.lora_B": (out, r)}``."""
        info = self.info(name)
        tensors = {}
        for module_name in info.modules:
            lora_A, lora_B = self.modules[module_name].read_slot(info.slot, info.rank)
            tensors[f"{module_name}.lora_A"], tensors[f"{module_name}.lora_B"] = lora_A, lora_B
        return tensors

    def remove(self, name: str) -> None:
        """Free the slot of ``name`` (zeroed); the base alone runs where it was active."""
        info = self.info(name)
        if self.merged == name:
            self.unmerge()
        for module in self.modules.values():
            with torch.no_grad():
                module.lora_A[info.slot].zero_()
                module.lora_B[info.slot].zero_()
        self._set_scale(info.slot, 0.0)
        del self.infos[name]
        if self.active == name:
            self.set_adapter(None)

    # ------------------------------------------------------------------ routing

    def set_adapter(self, name: str | None) -> None:
        """Run adapter ``name`` on every row (None: the base alone). Switching between loaded
        adapters writes one index buffer per module: no module is rebuilt and a compiled model
        is not recompiled (only switching to or from None changes the traced path)."""
        if self.merged is not None and name != self.merged:
            raise RuntimeError(f"adapter {self.merged!r} is merged into the base; unmerge() before switching")
        if name is None:
            self.active = None
            self.routing.mode = "off" if self.merged is None else "merged"
            return
        slot = self.info(name).slot
        for module in self.modules.values():
            module.active.fill_(slot)
        self.active = name
        self.routing.mode = "merged" if self.merged == name else "single"

    def ids(self, names: Sequence[str | None]) -> torch.Tensor:  # (B,) long
        """Slot ids of the adapters named per batch row (None = the base alone, id -1)."""
        device = next(iter(self.modules.values())).lora_A.device
        return torch.tensor([-1 if name is None else self.info(name).slot for name in names],
                            dtype=torch.long, device=device)

    @contextlib.contextmanager
    def mixed(self, adapter_ids: Sequence[str | None] | torch.Tensor) -> Iterator[torch.Tensor]:
        """Inside the block, batch row ``b`` runs adapter ``adapter_ids[b]`` (names or slot ids,
        None / -1 = base alone) in one gathered batched matmul per LoRA factor."""
        if self.merged is not None:
            raise RuntimeError(f"adapter {self.merged!r} is merged into the base; unmerge() before mixing")
        if isinstance(adapter_ids, torch.Tensor):
            row_ids = adapter_ids.to(dtype=torch.long, device=self.ids([]).device)
            used = {info.slot for info in self.infos.values()}
            bad = sorted({int(i) for i in row_ids.tolist() if i != -1 and i not in used})
            if bad:
                raise ValueError(f"adapter ids {bad} name no loaded adapter (slots in use: {sorted(used)})")
        else:
            row_ids = self.ids(adapter_ids)
        if row_ids.dim() != 1:
            raise ValueError(f"adapter_ids must be one id per batch row, got shape {tuple(row_ids.shape)}")
        saved = (self.routing.mode, self.routing.row_ids)
        self.routing.mode, self.routing.row_ids = "mixed", row_ids
        try:
            yield row_ids
        finally:
            self.routing.mode, self.routing.row_ids = saved

    # ------------------------------------------------------------------ merging

    @torch.no_grad()
    def merge(self, name: str | None = None) -> None:
        """Add adapter ``name`` (default the active one) into the base weights: ``W += s B A``
        (summed in float32); the LoRA path is skipped until :meth:`unmerge`."""
        name = name or self.active
        if name is None:
            raise ValueError("merge: no adapter named and none active")
        if self.merged is not None:
            raise RuntimeError(f"adapter {self.merged!r} is already merged; unmerge() first")
        slot = self.info(name).slot
        self.fingerprint()  # of the base as attached, before the merge changes its weights
        for module in self.modules.values():
            module.weight.copy_((module.weight.float() + module.delta(slot)).to(module.weight.dtype))
        self.merged, self.active = name, name
        self.routing.mode = "merged"

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapter again (exact to float rounding) and run it unmerged."""
        if self.merged is None:
            raise RuntimeError("unmerge: no adapter is merged")
        slot = self.info(self.merged).slot
        for module in self.modules.values():
            module.weight.copy_((module.weight.float() - module.delta(slot)).to(module.weight.dtype))
        name, self.merged = self.merged, None
        self.set_adapter(name)

    # ------------------------------------------------------------------ files

    def save(self, path, name: str | None = None, dtype: torch.dtype | None = None, metadata: dict | None = None):
        """Write adapter ``name`` (default the active one) as ``path.safetensors`` + ``path.json``
        (:func:`mmafm.lora.files.save_adapter`); returns the ``.safetensors`` path."""
        from mmafm.lora.files import save_adapter

        return save_adapter(self, path, name or self.active, dtype=dtype, metadata=metadata)

    def load(self, path, name: str | None = None, check_base: bool = True) -> AdapterInfo:
        """Read an adapter file into a free slot (or into the slot of ``name`` when loaded: a hot
        swap). A file made on another base is refused unless ``check_base=False``
        (:func:`mmafm.lora.files.load_adapter`)."""
        from mmafm.lora.files import load_adapter

        return load_adapter(self, path, name, check_base=check_base)

    # ------------------------------------------------------------------ detaching

    def detach(self) -> nn.Module:
        """Put plain ``nn.Linear`` modules back (same weight Parameters; a merged adapter is
        unmerged first) and return the model; the handle is unusable afterwards."""
        if self.merged is not None:
            self.unmerge()
        for name, module in self.modules.items():
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            linear.weight = module.weight
            if module.bias is not None:
                linear.bias = module.bias
            _set_submodule(self.model, name, linear)
        self.modules = {}
        self.model.__dict__.pop("_lora_adapters", None)
        return self.model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def adapters_of(model: nn.Module) -> Adapters:
    """The :class:`Adapters` handle :func:`attach_lora` gave ``model``."""
    handle = model.__dict__.get("_lora_adapters")
    if handle is None:
        raise ValueError(f"{type(model).__name__} carries no LoRA adapters; call mmafm.lora.attach_lora first")
    return handle


def attach_lora(
    model: nn.Module,
    rank: int = 16,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: str | Sequence[str] | None = None,
    slots: int = 1,
    name: str | None = "default",
    seed: int | None = 0,
) -> Adapters:
    """Replace the targeted linears of ``model`` by LoRA linears with ``slots`` adapter slots of
    rank ``rank``, freeze every base parameter, add adapter ``name`` (trainable, active).

    Args:
        model: any model (every registered family works; the linears are swapped in place).
        rank: slot rank; the new adapter's rank [paper: 16 in 2024; 32 in the 2025 toolkit].
        alpha: the new adapter's alpha; its scale is ``alpha / rank`` [teardown: 16 in the 2025 toolkit].
        dropout: dropout on the adapter input while training [open; peft's default 0].
        targets: module-name patterns (see :func:`matches`; a comma-separated string works);
            default :data:`DEFAULT_TARGETS`, every attention and FFN linear.
        slots: adapters held at once (mixed batches and swaps choose among them).
        name: the first adapter's name; None = no adapter yet (load some, or :meth:`Adapters.add`).
        seed: seeds the new adapter's initialisation (None: torch's global RNG).

    Returns:
        The :class:`Adapters` handle (also ``adapters_of(model)``).
    """
    if "_lora_adapters" in model.__dict__:
        raise ValueError(f"{type(model).__name__} already carries LoRA adapters (adapters_of(model))")
    patterns = _targets(targets)
    names = target_modules(model, patterns)
    for param in model.parameters():
        param.requires_grad_(False)
    routing = AdapterRouting(dropout)
    modules: dict[str, LoRALinear] = {}
    for module_name in names:
        module = LoRALinear(model.get_submodule(module_name), routing, slots, rank)
        _set_submodule(model, module_name, module)
        modules[module_name] = module
    adapters = Adapters(model, modules, routing, patterns)
    model.__dict__["_lora_adapters"] = adapters  # a plain attribute: not a submodule, not in state_dict
    if name is not None:
        adapters.add(name, rank, alpha, seed=seed)
        adapters.set_adapter(name)
    return adapters
