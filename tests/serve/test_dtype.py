"""`--dtype bf16` and `--weights int8/int4` against the fp32 default on the tiny Llama, loaded as the server loads them:
adapters stay fp32; a mixed batch's logits stay within a stated tolerance of fp32's at every step (decode steps fed
fp32's tokens, so one early difference does not compound); greedy tokens differ only where fp32's own top two
logits are closer than that; and an int8 or int4 server answers through the openai SDK, never changing its weights."""

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch

from lorakit.layers import LoraModule
from lorakit.quant import Int4Linear, Int8Linear
from lorakit.row_tables import RowTables
from lorakit.serve.kv import GrowingCache, KVBatch, left_pad
from lorakit.serve.prefill import batch_rows
from lorakit.serve.registry import AdapterRegistry
from lorakit.serve.server import load_base
from tests.serve.conftest import start

PROMPTS = ["name : The Eagle | food : Chinese", "area : riverside", "The Mill is a pub", "eatType : coffee shop"]
NAMES = ["a0", None, "a1", "a2"]
STEPS = 8
# max |logit - fp32 logit| / max |fp32 logit| over every row and step. Measured on this model: bf16 0.019, int8
# 0.043, bf16 + int8 0.038, int4 0.333 (greedy choices equal in 31, 32, 31 and 20 of the 32 row-steps); the
# tolerances leave ~2x. bf16 keeps 8 significant bits of every activation; int8's weights are within half a step
# (max|row|/254) of fp32's and its matmuls round to bf16 (tests/test_quant.py bounds one layer). int4's step is 1/15
# of a group's range, ~1/3 of these random Gaussian weights' std: the worst case for 4 bits. On SmolLM2, whose GGUF
# weights are already 4-bit in the same groups, int4 loses only bf16 roundings (tests/test_models.py).
TOL = {("bf16", "dense"): 0.04, ("fp32", "int8"): 0.08, ("bf16", "int8"): 0.08, ("fp32", "int4"): 0.66}


def _load(llama_dir, llama_adapters, dtype, weights):
    model, tok, _, _ = load_base(Path(llama_dir), llama_adapters, dtype, weights)
    registry = AdapterRegistry(llama_adapters, 16)
    for name in {n for n in NAMES if n}:
        registry.install(model, registry.plan(model, name, llama_adapters / name, threading.Lock()))
    return model, tok


@torch.inference_mode()
def _logits(model, tok, forced=None):
    """Per row and step the last position's logits (rows, STEPS, vocab) in fp32, as the engine runs them: a mixed
    prefill, then decode steps from the slot tables. Steps feed `forced` tokens (rows, STEPS) when given."""
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    ids, mask, pos = left_pad(prompts, tok.pad_token_id)
    with batch_rows(NAMES):
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=GrowingCache())
    batch, steps = KVBatch(out.past_key_values, mask, [len(p) for p in prompts]), [out.logits[:, -1].float()]
    tables = RowTables(4)
    assert tables.sync(model, NAMES)
    for k in range(1, STEPS):
        last = (forced[:, k - 1] if forced is not None else steps[-1].argmax(-1))[:, None]
        mask, pos = batch.step_inputs()
        with batch_rows(NAMES, tables):
            steps.append(model(input_ids=last, attention_mask=mask, position_ids=pos,
                               past_key_values=batch.cache).logits[:, -1].float())
        batch.stepped(mask)
    return torch.stack(steps, 1)


@pytest.fixture(scope="module")
def fp32_run(llama_dir, llama_adapters):
    model, tok = _load(llama_dir, llama_adapters, "fp32", "dense")
    logits = _logits(model, tok)
    return logits, logits.argmax(-1)


@pytest.mark.parametrize("dtype,weights", list(TOL))
def test_logits_and_greedy_tokens_agree_with_fp32_and_adapters_stay_fp32(llama_dir, llama_adapters, fp32_run,
                                                                         dtype, weights):
    model, tok = _load(llama_dir, llama_adapters, dtype, weights)
    loras = [m for m in model.modules() if isinstance(m, LoraModule)]
    assert loras and all(p.dtype == torch.float32 for m in loras for n in m.adapter_names for p in m.adapter_params(n))
    if weights != "dense":  # int4: the LM head stays int8 (lorakit.quant.quantize_int4)
        kind = Int8Linear if weights == "int8" else Int4Linear
        assert all(isinstance(m.base_layer, kind) for m in loras) and isinstance(model.lm_head, Int8Linear)
    else:
        assert all(m.base_layer.weight.dtype == torch.bfloat16 for m in loras)
    ref, ref_tokens = fp32_run
    got = _logits(model, tok, forced=ref_tokens)
    tol = TOL[dtype, weights] * float(ref.abs().max())
    assert float((got - ref).abs().max()) <= tol
    # Where the greedy choice differs, fp32 itself nearly tied between the two tokens.
    picked = got.argmax(-1)
    margin = ref.gather(-1, ref_tokens[..., None]) - ref.gather(-1, picked[..., None])
    assert torch.all(margin[picked != ref_tokens] <= 2 * tol)


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_server_answers_through_the_sdk_and_never_changes_its_weights(llama_dir, llama_adapters, weights):
    srv = start(llama_dir, llama_adapters, max_loaded=16, max_batch=32, weights=weights)
    try:
        model = srv.server.engine.model
        before = {k: v.clone() for k, v in model.state_dict().items()}
        client = openai.OpenAI(base_url=srv.url, api_key="x", timeout=30, max_retries=0)
        work = [(m, p) for p in PROMPTS for m in ["a0", "a1", "a2", "a3", llama_dir.rstrip("/").split("/")[-1]]]

        def ask(item):
            r = client.completions.create(model=item[0], prompt=item[1], max_tokens=6, temperature=0)
            return r.choices[0].text, r.usage.completion_tokens

        with ThreadPoolExecutor(len(work)) as pool:  # mixed batches
            mixed = list(pool.map(ask, work))
        alone = [ask(item) for item in work]  # one request at a time
        assert mixed == alone and all(n > 0 for _, n in alone)
        after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
        assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert any(v.dtype == (torch.int8 if weights == "int8" else torch.uint8) for v in after.values())
    finally:
        srv.close()
