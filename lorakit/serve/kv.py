"""The running batch's KV cache, left-padded, and a prompt cache keyed by adapter as well as tokens.

Layout: one transformers cache (`GrowingCache`, a DynamicCache) for all running rows; per layer keys/values
(rows, heads, L, dim).
Row i's real tokens are the last `lengths[i]` columns; the columns before are padding, masked out by
`mask` (rows, L). Every decode step appends one column for every row, so padding stays a prefix. Between
steps rows leave (`select`), groups join (`merge`, padding the shorter on the left), and columns that are
padding for every row are dropped (`trim`). RoPE positions come from `lengths`, never from the column.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views of a buffer with spare columns: a decode step writes its
    column in place instead of `torch.cat` copying the layer's whole cache (all rows) every step. The buffer
    doubles when full, so the copying is amortised O(1) per token. Assign new tensors through `adopt`."""

    _k: Tensor | None = None
    _v: Tensor | None = None

    def adopt(self, keys: Tensor, values: Tensor) -> None:
        self.keys, self.values, self._k, self._v = keys, values, keys, values

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.adopt(key_states[:, :, :0], value_states[:, :, :0])
        n, add = self.keys.shape[2], key_states.shape[2]
        k0 = self._k
        fresh = k0 is None or self.keys.data_ptr() != k0.data_ptr() or k0.shape[:2] != self.keys.shape[:2]
        if fresh or n + add > self._k.shape[2]:  # (re)buffer: the first step after a select/merge, or full
            cap = max(n + add, 2 * n, 16)
            k = key_states.new_empty(*key_states.shape[:2], cap, key_states.shape[3])
            v = value_states.new_empty(*value_states.shape[:2], cap, value_states.shape[3])
            k[:, :, :n], v[:, :, :n] = self.keys, self.values
            self._k, self._v = k, v
        self._k[:, :, n:n + add] = key_states
        self._v[:, :, n:n + add] = value_states
        self.keys, self.values = self._k[:, :, :n + add], self._v[:, :, :n + add]
        return self.keys, self.values


class GrowingCache(DynamicCache):
    """A DynamicCache of GrowingLayers (one per decoder layer, created on first update)."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)


@dataclass
class KVBatch:
    cache: DynamicCache
    mask: Tensor  # (rows, L) long: 1 = a real token in the cache
    lengths: list[int]  # real tokens per row

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def layers(self) -> list:
        return [layer for layer in self.cache.layers if layer.is_initialized]

    def select(self, rows: list[int]) -> None:
        """Keep only `rows` (a leaving request leaves at once), then drop all-padding columns."""
        idx = torch.tensor(rows, dtype=torch.long)
        for layer in self.layers():
            layer.adopt(layer.keys[idx], layer.values[idx])
        self.mask = self.mask[idx]
        self.lengths = [self.lengths[i] for i in rows]
        self.trim()

    def trim(self) -> None:
        drop = self.width - max(self.lengths, default=0)
        if drop > 0:
            for layer in self.layers():
                layer.adopt(layer.keys[:, :, drop:], layer.values[:, :, drop:])
            self.mask = self.mask[:, drop:]

    def pad_left(self, n: int) -> None:
        if n <= 0:
            return
        for layer in self.layers():
            k, v = layer.keys, layer.values
            layer.adopt(torch.cat([k.new_zeros(*k.shape[:2], n, k.shape[3]), k], 2),
                        torch.cat([v.new_zeros(*v.shape[:2], n, v.shape[3]), v], 2))
        self.mask = torch.cat([self.mask.new_zeros(self.mask.shape[0], n), self.mask], 1)

    def merge(self, other: KVBatch) -> None:
        """Append `other`'s rows below ours (both left-padded to the wider one)."""
        width = max(self.width, other.width)
        self.pad_left(width - self.width)
        other.pad_left(width - other.width)
        for mine, theirs in zip(self.layers(), other.layers(), strict=True):
            mine.adopt(torch.cat([mine.keys, theirs.keys], 0), torch.cat([mine.values, theirs.values], 0))
        self.mask = torch.cat([self.mask, other.mask], 0)
        self.lengths = self.lengths + other.lengths

    def step_inputs(self) -> tuple[Tensor, Tensor]:
        """(attention_mask with the new column, position_ids) for a one-token decode step."""
        mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
        return mask, torch.tensor(self.lengths, dtype=torch.long).unsqueeze(1)

    def stepped(self, mask: Tensor) -> None:
        """Record the column the forward just appended."""
        self.mask = mask
        self.lengths = [n + 1 for n in self.lengths]

    def row(self, i: int) -> list[tuple[Tensor, Tensor]]:
        """Row i's real KV, per layer, as (1, heads, n, dim) copies."""
        n = self.lengths[i]
        return [(layer.keys[i:i + 1, :, -n:].clone(), layer.values[i:i + 1, :, -n:].clone())
                for layer in self.layers()]

    @classmethod
    def from_row(cls, kv: list[tuple[Tensor, Tensor]]) -> KVBatch:
        cache = GrowingCache()
        for k, v in kv:
            layer = GrowingLayer()
            layer.lazy_initialization(k, v)
            layer.adopt(k.clone(), v.clone())
            cache.layers.append(layer)
        n = kv[0][0].shape[2]
        return cls(cache, torch.ones(1, n, dtype=torch.long), [n])


def empty_batch() -> KVBatch:
    return KVBatch(GrowingCache(), torch.zeros(0, 0, dtype=torch.long), [])


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, position_ids) for prompts of different lengths, padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


def stack_right(batches: list[dict[str, torch.Tensor]], pad_id: int) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Right-pad tokenizer batches to one width and stack their rows; returns the batch and each one's row count."""
    width = max(b["input_ids"].shape[1] for b in batches)
    keys = [k for k in batches[0] if all(k in b for b in batches)]
    out = {}
    for k in keys:
        fill = pad_id if k == "input_ids" else 0
        out[k] = torch.cat([F.pad(b[k], (0, width - b[k].shape[1]), value=fill) for b in batches], 0)
    return out, [b["input_ids"].shape[0] for b in batches]


class PromptCache:
    """Prompt → (its KV, the logits after it), LRU, holding at most `capacity` prompt tokens in all.

    The key is (adapter name, adapter version, prompt tokens): KV computed under one adapter is never reused
    for another, nor for a later reload of the same name from a different file (llama.cpp's bug #26207).
    Bounded in tokens, not entries: SmolLM2's KV is 46 KB per token (30 layers x 2 x 3 heads x 64 x fp32).
    """

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity, self.tokens = capacity, 0
        self.entries: OrderedDict[tuple, tuple[list[tuple[Tensor, Tensor]], Tensor]] = OrderedDict()

    def get(self, key: tuple) -> tuple[list[tuple[Tensor, Tensor]], Tensor] | None:
        hit = self.entries.get(key)
        if hit is not None:
            self.entries.move_to_end(key)
        return hit

    def put(self, key: tuple, kv: list[tuple[Tensor, Tensor]], logits: Tensor) -> None:
        n = len(key[2])
        if n > self.capacity or key in self.entries:
            return
        self.entries[key] = (kv, logits.clone())
        self.tokens += n
        while self.tokens > self.capacity:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: tuple) -> None:
        del self.entries[key]
        self.tokens -= len(key[2])

    def drop_adapter(self, name: str) -> None:
        for key in [k for k in self.entries if k[0] == name]:
            self._drop(key)
