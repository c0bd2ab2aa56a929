"""Prefill for the engine: the prompt KV and first-token logits of newly admitted choices, and the row context.

Every prompt missing from the prompt cache is left-padded into ONE forward, whatever its adapter (each row picks
its own through `batch_rows`); a cached prompt costs no forward. The engine samples the first tokens from the
logits returned here and merges the rows into its running batch (engine.py).
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.row_tables import RowTables
from lorakit.rows import adapter_rows

from .jobs import Seq
from .kv import GrowingCache, KVBatch, PromptCache, left_pad

# seq index -> (its KV batch, its row in that batch, its last position's logits)
Parts = dict[int, tuple[KVBatch, int, torch.Tensor]]


def batch_rows(names: list[str | None], tables: RowTables | None = None):
    """The per-row adapter choice for one forward (None = the base), through lorakit's context variable:
    only this thread's forwards see it, and nothing is written on the model."""
    known = list(dict.fromkeys(n for n in names if n is not None))
    return adapter_rows(known, [known.index(n) if n is not None else -1 for n in names], tables=tables)


@torch.inference_mode()
def prompt_states(model: nn.Module, seqs: list[Seq], versions: dict[str, int], cache: PromptCache, pad_id: int,
                  forward_kw: dict) -> tuple[Parts, int]:
    """Each seq's prompt KV and logits: from the prompt cache (keyed on adapter, its load version and the
    prompt), else from one batched forward whose rows are then cached. Returns (parts, cache hits)."""
    keys = [(s.adapter, versions.get(s.adapter, 0), tuple(s.job.prompt)) for s in seqs]
    cached = [cache.get(k) for k in keys]
    misses = [i for i, c in enumerate(cached) if c is None]
    parts: Parts = {}
    if misses:
        ids, mask, pos = left_pad([seqs[i].job.prompt for i in misses], pad_id)
        with batch_rows([seqs[i].adapter for i in misses]):
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=GrowingCache(),
                        use_cache=True, **forward_kw)
        fresh = KVBatch(out.past_key_values, mask, [len(seqs[i].job.prompt) for i in misses])
        for row, i in enumerate(misses):
            parts[i] = (fresh, row, out.logits[row, -1])
            if len(keys[i][2]) <= cache.capacity and keys[i] not in cache.entries:
                cache.put(keys[i], fresh.row(row), out.logits[row, -1])
    for i, hit in enumerate(cached):
        if hit is not None:
            parts[i] = (KVBatch.from_row(hit[0]), 0, hit[1])
    return parts, len(seqs) - len(misses)


def by_batch(joining: list[tuple[int, Seq]], parts: Parts) -> list[tuple[KVBatch, list[int], list[Seq]]]:
    """Group the joining seqs by the KV batch holding their prompt: (that batch, their rows in it, the seqs)."""
    groups: dict[int, tuple[KVBatch, list[int], list[Seq]]] = {}
    for i, seq in joining:
        kv, row, _ = parts[i]
        groups.setdefault(id(kv), (kv, [], []))[1].append(row)
        groups[id(kv)][2].append(seq)
    return list(groups.values())
