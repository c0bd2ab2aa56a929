"""The engine's batch KV layout: rows prefilled in different groups, merged, decoded together under different
adapters, one leaving mid-way; every row's logits equal that row run alone through a model with its adapter
merged (dense W0 + s·B·A), within 1e-4."""

import torch

import lorakit
from tests.serve.conftest import adapted_tiny_llama, prefill_rows

TOL = 1e-4  # fp32: batched and single-row matmuls differ by rounding only


def test_merged_groups_decode_like_each_row_alone():
    model, refs = adapted_tiny_llama(["q_proj", "v_proj", "down_proj"])
    rows = [([5, 6, 7, 8, 9], "x"), ([11, 12], None), ([13, 14, 15], "y"), ([16, 17, 18, 19, 20, 21, 22], "x")]

    with torch.inference_mode():
        batch, first = prefill_rows(model, rows[:2])
        other, second = prefill_rows(model, rows[2:])
        batch.merge(other)
        seqs = [list(p) + [int(t)] for (p, _), t in zip(rows, torch.cat([first, second]).argmax(-1), strict=True)]
        names = [a for _, a in rows]
        for step in range(40):  # past the buffers' first doubling
            if step == 2:  # row 1 leaves; the others keep decoding
                batch.select([0, 2, 3])
                seqs, names = [seqs[i] for i in (0, 2, 3)], [names[i] for i in (0, 2, 3)]
            mask, pos = batch.step_inputs()
            ids = torch.tensor([[s[-1]] for s in seqs])
            with lorakit.per_row_adapters(model, names):
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                               past_key_values=batch.cache).logits[:, -1]
            batch.stepped(mask)
            for i, (s, name) in enumerate(zip(seqs, names, strict=True)):
                alone = refs[name](input_ids=torch.tensor([s])).logits[0, -1]
                assert (logits[i] - alone).abs().max() < TOL
                s.append(int(logits[i].argmax()))
        assert batch.width == max(batch.lengths)  # leaving rows' padding columns were dropped


def test_prompt_cache_is_bounded_in_tokens_and_keyed_by_adapter_version():
    from lorakit.serve.kv import PromptCache

    kv = [(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))]
    cache = PromptCache(capacity=7)
    cache.put(("x", 1, (1, 2, 3)), kv, torch.zeros(4))
    cache.put(("y", 2, (1, 2, 3)), kv, torch.ones(4))
    assert cache.get(("x", 1, (1, 2, 3))) is not None and cache.get(("x", 3, (1, 2, 3))) is None  # version counts
    assert torch.equal(cache.get(("y", 2, (1, 2, 3)))[1], torch.ones(4))
    cache.put(("z", 4, (5, 6, 7)), kv, torch.zeros(4))  # 9 tokens > 7: the least recently used (x) goes
    assert cache.get(("x", 1, (1, 2, 3))) is None and cache.tokens == 6
    cache.put(("w", 5, tuple(range(8))), kv, torch.zeros(4))  # longer than the whole budget: not kept
    assert cache.tokens == 6
    cache.drop_adapter("y")
    assert list(cache.entries) == [("z", 4, (5, 6, 7))] and cache.tokens == 3
