"""The engine's lean Llama decode step: on a left-padded batch of rows prefilled in two groups, under different
adapters (and the base), one row leaving mid-way, every row's logits equal that row run alone through a model
with its adapter merged (dense W0 + s·B·A), within 1e-4; architectures it does not reproduce get None."""

import pytest
import torch

import lorakit
from lorakit.serve.decode_step import lean_step
from tests.conftest import make_tiny
from tests.serve.conftest import adapted_tiny_llama, prefill_rows

TOL = 1e-4  # fp32: batched and single-row matmuls differ by rounding only


@pytest.mark.parametrize("rows", [
    [([5, 6, 7, 8, 9], "x"), ([11, 12], None), ([13, 14, 15], "y"), ([16, 17, 18, 19, 20, 21, 22], "x")],
    [([3, 4, 5, 6], "y")],  # batch 1, no padding: no mask at all
])
def test_lean_step_equals_each_row_alone_with_its_adapter_merged(rows):
    model, refs = adapted_tiny_llama(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    step = lean_step(model)
    assert step is not None

    with torch.inference_mode():
        half = max(1, len(rows) // 2)
        batch, first = prefill_rows(model, rows[:half])
        logits = [first]
        if rows[half:]:
            other, second = prefill_rows(model, rows[half:])
            batch.merge(other)
            logits.append(second)
        seqs = [list(p) + [int(t)] for (p, _), t in zip(rows, torch.cat(logits).argmax(-1), strict=True)]
        names = [a for _, a in rows]
        for n in range(40):  # past the KV buffers' first doubling
            if n == 2 and len(rows) > 1:  # row 1 leaves; the others keep decoding
                keep = [i for i in range(len(rows)) if i != 1]
                batch.select(keep)
                seqs, names = [seqs[i] for i in keep], [names[i] for i in keep]
            mask, pos = batch.step_inputs()
            with lorakit.per_row_adapters(model, names):
                out = step(torch.tensor([[s[-1]] for s in seqs]), mask, pos, batch.cache)
            batch.stepped(mask)
            for i, (s, name) in enumerate(zip(seqs, names, strict=True)):
                alone = refs[name](input_ids=torch.tensor([s])).logits[0, -1]
                assert (out[i] - alone).abs().max() < TOL
                s.append(int(out[i].argmax()))


def test_other_architectures_fall_back_to_the_models_forward():
    assert lean_step(make_tiny("gpt2").eval()) is None
