"""Prefill (lorakit/serve/prefill.py): prompts of different lengths and adapters left-padded into one forward give
each row the logits and KV of that prompt run alone through a model with its adapter merged (dense W0 + s·B·A);
a repeated prompt comes from the prompt cache, with no forward, and a new adapter version misses it."""

import asyncio

import torch

from lorakit.serve.jobs import Job, Seq
from lorakit.serve.kv import PromptCache
from lorakit.serve.prefill import by_batch, prompt_states
from lorakit.serve.sampling import Sampling
from tests.serve.conftest import adapted_tiny_llama

TOL = 1e-4  # fp32: batched and single-row matmuls differ by rounding only


def _seqs(rows: list[tuple[list[int], str | None]]) -> list[Seq]:
    loop = asyncio.new_event_loop()
    jobs = [Job("generate", a, str(a), loop, prompt=p, sampling=Sampling(max_tokens=4)) for p, a in rows]
    return [Seq(j, 0, None, 64, set()) for j in jobs]


def test_one_forward_gives_each_row_its_own_logits_and_kv_and_the_cache_serves_repeats():
    model, refs = adapted_tiny_llama(["q_proj", "v_proj", "down_proj"])
    rows = [([5, 6, 7, 8, 9], "x"), ([11, 12], None), ([13, 14, 15], "y"), ([5, 6, 7, 8, 9], "y")]
    cache, versions = PromptCache(capacity=100), {"x": 1, "y": 1}
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))

    parts, hits = prompt_states(model, _seqs(rows), versions, cache, 0, {})
    assert hits == 0 and len(calls) == 1  # four prompts, three adapters (one the base): one forward
    with torch.inference_mode():
        for i, (prompt, name) in enumerate(rows):
            alone = refs[name](input_ids=torch.tensor([prompt]), use_cache=True)
            kv, row, logits = parts[i]
            assert (logits - alone.logits[0, -1]).abs().max() < TOL
            keys = kv.row(row)[0][0]  # layer 0's keys for this row, its padding columns dropped
            assert keys.shape[-2] == len(prompt)
            assert (keys - alone.past_key_values.layers[0].keys).abs().max() < TOL

    again, hits = prompt_states(model, _seqs(rows[:3]), versions, cache, 0, {})
    assert hits == 3 and len(calls) == 1  # all from the cache: no forward
    for i in range(3):
        assert torch.equal(again[i][2], parts[i][2])
    _, hits = prompt_states(model, _seqs(rows[:1]), {"x": 2, "y": 1}, cache, 0, {})
    assert hits == 0 and len(calls) == 2  # "x" was reloaded: its cached prompt no longer applies

    groups = by_batch([(0, "s0"), (1, "s1"), (3, "s3")], parts)  # one KV batch: rows 0, 1, 3 together
    assert [(rws, seqs) for _, rws, seqs in groups] == [([0, 1, 3], ["s0", "s1", "s3"])]
    groups = by_batch([(0, "a"), (1, "b")], {**again, 1: parts[1]})
    assert sorted(len(s) for _, _, s in groups) == [1, 1]  # a cached row and a fresh one: two batches
