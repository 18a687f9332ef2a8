"""Key/value cache for incremental decoding, sized the way the AFM models need it.

- Global-attention layers keep one slot per position (a linear buffer of ``max_len`` slots).
- Sliding-window layers keep only their window: a ring buffer of ``min(window, max_len)`` slots,
  slot ``t % window`` holding position ``t`` (the 2025 server's local layers, window 4096).
- KV-shared layers (segment 2 of the 2025 on-device model) store nothing: they read the K/V of
  segment 1's last layer, which is how sharing cuts the cache to 35/56 (2025 report, "KV-cache
  sharing").
- ``quantized=True`` stores int8 values with one scale per (row, head, slot), in the spirit of the
  2025 on-device model's 8-bit KV cache.

``KVCache.nbytes`` counts exactly the bytes of the stored keys, values and scales (the per-position
bookkeeping — one bool and one int per row — is not counted), and :func:`kv_cache_nbytes` gives
the same number in closed form without allocating anything.

Time is counted in *columns* of the (left-padded) batch: column ``t`` is the ``t``-th token fed to
the cache. Padding columns are marked invalid in ``valid`` and masked out as keys.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

__all__ = [
    "CacheSpec",
    "LayerKV",
    "KVCache",
    "kv_cache_nbytes",
    "quantize_int8",
    "dequantize_int8",
]


class CacheSpec(NamedTuple):
    """What one attention layer keeps: nothing (``stores=False``), all positions (``window``
    None) or a ring of its sliding window."""

    stores: bool
    window: int | None


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 over the last dim: ``x ~= q * scale`` with one scale per vector."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-8) / 127.0
    quantized = torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8)
    return quantized, scale.to(x.dtype)


def dequantize_int8(quantized: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_int8`."""
    return (quantized.float() * scale.float()).to(dtype)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _slots(spec: CacheSpec, max_len: int) -> int:
    return max_len if spec.window is None else min(spec.window, max_len)


def kv_cache_nbytes(
    specs: Sequence[CacheSpec],
    batch_size: int,
    max_len: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    quantized: bool = False,
) -> int:
    """Bytes a :class:`KVCache` with these layer specs allocates (closed form)."""
    total = 0
    for spec in specs:
        if not spec.stores:
            continue
        vectors = batch_size * num_kv_heads * _slots(spec, max_len)  # per tensor (K or V)
        if quantized:
            per_vector = head_dim * 1 + _element_size(dtype)  # int8 values + one scale
        else:
            per_vector = head_dim * _element_size(dtype)
        total += 2 * vectors * per_vector
    return total


class LayerKV:
    """K/V storage of one layer: ``slots`` vectors per (row, KV head), optionally int8."""

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, slots: int,
                 dtype: torch.dtype, device: torch.device | str | None, quantized: bool):
        shape = (batch_size, num_kv_heads, slots, head_dim)
        self.dtype, self.quantized = dtype, quantized
        store_dtype = torch.int8 if quantized else dtype
        self.keys = torch.zeros(shape, dtype=store_dtype, device=device)
        self.values = torch.zeros(shape, dtype=store_dtype, device=device)
        if quantized:
            self.key_scales = torch.zeros(shape[:-1] + (1,), dtype=dtype, device=device)
            self.value_scales = torch.zeros(shape[:-1] + (1,), dtype=dtype, device=device)

    def _tensors(self) -> list[torch.Tensor]:
        extra = [self.key_scales, self.value_scales] if self.quantized else []
        return [self.keys, self.values, *extra]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def round_trip(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the cache will give it back (cast, and int8 round trip if quantized)."""
        if self.quantized:
            return dequantize_int8(*quantize_int8(x.to(self.dtype)), self.dtype)
        return x.to(self.dtype)

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor | slice) -> None:
        """Store ``k``, ``v`` (B, Hkv, n, D) at ``slots`` (a slice or n distinct indices)."""
        for buffer, scales, x in ((self.keys, "key_scales", k), (self.values, "value_scales", v)):
            if self.quantized:
                quantized, scale = quantize_int8(x.to(self.dtype))
                _put(buffer, slots, quantized)
                _put(getattr(self, scales), slots, scale)
            else:
                _put(buffer, slots, x)  # copy_ casts to the cache dtype

    def read(self, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots ``[0, end)`` (all slots by default), dequantized."""
        if not self.quantized:
            if end is None:
                return self.keys, self.values
            return self.keys.narrow(2, 0, end), self.values.narrow(2, 0, end)
        return (
            dequantize_int8(self.keys[:, :, :end], self.key_scales[:, :, :end], self.dtype),
            dequantize_int8(self.values[:, :, :end], self.value_scales[:, :, :end], self.dtype),
        )


def _put(buffer: torch.Tensor, slots: torch.Tensor | slice, x: torch.Tensor) -> None:
    if isinstance(slots, slice):
        buffer.narrow(2, slots.start, slots.stop - slots.start).copy_(x)  # in place, no indexing machinery
    else:
        buffer.index_copy_(2, slots, x.to(buffer.dtype))


class KVCache:
    """The cache of a whole model: one :class:`LayerKV` (or ``None``) per attention layer.

    A forward pass with a cache calls :meth:`begin` once, :meth:`update` once per storing layer,
    then :meth:`end`; the model does this, users only create the cache (``model.new_cache``) and
    pass it to every call.

    Args:
        specs: one :class:`CacheSpec` per attention layer, in the model's layer order.
        batch_size: rows.
        max_len: most columns (prompt + generated tokens) the cache will hold.
        num_kv_heads: KV heads per layer.
        head_dim: head dimension.
        dtype: storage dtype (scale dtype when quantized).
        device: where to allocate.
        quantized: store int8 values plus per-vector scales.
    """

    def __init__(self, specs: Sequence[CacheSpec], batch_size: int, max_len: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, quantized: bool = False):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"KV cache needs batch_size >= 1 and max_len >= 1, got {batch_size}, {max_len}")
        self.specs = list(specs)
        self.batch_size, self.max_len = batch_size, max_len
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype, self.quantized = dtype, quantized
        self.layers: list[LayerKV | None] = [
            LayerKV(batch_size, num_kv_heads, head_dim, _slots(s, max_len), dtype, device, quantized)
            if s.stores else None
            for s in self.specs
        ]
        self.windows = sorted({s.window for s in self.specs if s.stores and s.window is not None})
        self.length = 0  # columns filled so far
        self.has_padding = False  # any padding column so far (then masks must hide it)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # real token?
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._time = torch.arange(max_len, device=device)  # column numbers; steps take slices (views)
        # absolute column held by each ring slot (-1 = empty), shared by all layers of one window
        self.slot_time = {
            w: torch.full((min(w, max_len),), -1, dtype=torch.long, device=device) for w in self.windows
        }
        self._step: dict | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of stored keys, values (and int8 scales); equals :func:`kv_cache_nbytes`."""
        return sum(layer.nbytes for layer in self.layers if layer is not None)

    @property
    def device(self) -> torch.device:
        return self.valid.device

    def begin(self, num_new: int, chunk_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Open a forward step over ``num_new`` columns; returns their positions (B, T).

        Args:
            chunk_mask: (B, T), 1 for real tokens and 0 for (left) padding; all real if None.
        """
        if self._step is not None:
            raise RuntimeError("KVCache.begin called twice without end(); was a forward interrupted?")
        start = self.length
        if start + num_new > self.max_len:
            raise ValueError(
                f"KV cache is full: {start} columns held + {num_new} new > max_len={self.max_len}; "
                f"create the cache with a larger max_len"
            )
        device = self.device
        if chunk_mask is None:  # every new column is a real token (decoding): no mask arithmetic
            self.valid.narrow(1, start, num_new).fill_(True)
            positions = self.next_position[:, None] + self._time[:num_new]  # (B, T)
            new_count: torch.Tensor | int = num_new
        else:
            chunk_mask = chunk_mask.to(device=device, dtype=torch.bool)
            if chunk_mask.shape != (self.batch_size, num_new):
                raise ValueError(
                    f"attention mask for this step must be ({self.batch_size}, {num_new}), "
                    f"got {tuple(chunk_mask.shape)}"
                )
            self.has_padding = self.has_padding or not bool(chunk_mask.all())
            self.valid[:, start : start + num_new] = chunk_mask
            counts = chunk_mask.long().cumsum(dim=1)
            positions = (self.next_position[:, None] + counts - 1).clamp(min=0)  # (B, T)
            new_count = counts[:, -1]
        new_time = self._time[start : start + num_new]
        step = {"start": start, "num_new": num_new, "counts": new_count, "new_time": new_time,
                "linear_time": self._time[: start + num_new], "ring": {}}
        for window, slot_time in self.slot_time.items():
            slots = slot_time.numel()
            kept = min(num_new, slots)
            kept_time = new_time[num_new - kept :]
            updated = slot_time.clone()
            updated[kept_time % slots] = kept_time
            if num_new == 1:  # write first, then attend over the ring alone (no copy)
                key_time = updated
            else:  # attend over [old ring, new keys], then keep the newest keys in the ring
                key_time = torch.cat((slot_time, new_time))
            step["ring"][window] = {"slots": kept_time % slots, "kept": kept, "key_time": key_time,
                                    "updated": updated}
        self._step = step
        return positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add this step's keys/values (B, Hkv, T, D) of ``layer``.

        Returns:
            ``(keys, values, key_time)``: everything the layer's queries may look at
            (B, Hkv, S, D) and the column of each key (S,), -1 for empty ring slots.
        """
        step, store = self._step, self.layers[layer]
        if step is None:
            raise RuntimeError("KVCache.update called outside begin()/end()")
        if store is None:
            raise RuntimeError(f"layer {layer} shares K/V and has no cache of its own")
        window = self.specs[layer].window
        start, num_new = step["start"], step["num_new"]
        if window is None:
            store.write(k, v, slice(start, start + num_new))
            keys, values = store.read(start + num_new)
            return keys, values, step["linear_time"]
        ring = step["ring"][window]
        kept = ring["kept"]
        if num_new == 1:
            store.write(k, v, ring["slots"])
            keys, values = store.read()
            return keys, values, ring["key_time"]
        old_keys, old_values = store.read()
        keys = torch.cat((old_keys, store.round_trip(k)), dim=2)
        values = torch.cat((old_values, store.round_trip(v)), dim=2)
        store.write(k[:, :, num_new - kept :], v[:, :, num_new - kept :], ring["slots"])
        return keys, values, ring["key_time"]

    def key_valid(self) -> torch.Tensor:  # (B, columns so far incl. this step)
        """Which columns hold real (non-padding) tokens, up to the end of the open step."""
        end = self.length + (self._step["num_new"] if self._step else 0)
        return self.valid[:, :end]

    def end(self) -> None:
        """Close the step opened by :meth:`begin`."""
        step = self._step
        if step is None:
            raise RuntimeError("KVCache.end called without begin()")
        for window, ring in step["ring"].items():
            self.slot_time[window] = ring["updated"]
        self.length += step["num_new"]
        self.next_position += step["counts"]
        self._step = None

    def abort(self) -> None:
        """Forget a step that failed midway (the cache contents of that step are undefined)."""
        self._step = None
