"""Per-row adapters: one forward, one adapter per row, through a context variable (threads never mix)."""

import threading

import pytest
import torch

from lorakit import LoraConfig, LoraStateError, adapter_rows, inject, per_row_adapters, set_adapter
from lorakit.errors import LoraConfigError
from tests.conftest import logits_alone, make_tiny, randomize_adapters

IDS = torch.tensor([[5, 17, 42, 8, 9], [3, 3, 71, 20, 1], [60, 2, 14, 15, 90]])


def _two_adapter_llama(dropout=0.0):
    model = make_tiny("llama")
    inject(model, LoraConfig(r=4, targets=["q_proj", "v_proj"], dropout=dropout), "a")
    inject(model, LoraConfig(r=2, targets=["v_proj", "o_proj", "down_proj"]), "b")
    randomize_adapters(model, "a", seed=1, std=0.3)
    randomize_adapters(model, "b", seed=2, std=0.3)
    return model


def test_rows_equal_each_adapter_alone_and_nothing_is_written_on_the_layers():
    model = _two_adapter_llama()
    names = ["b", None, "a"]
    before = {n: dict(vars(m)) for n, m in model.named_modules()}
    with torch.no_grad(), per_row_adapters(model, names):
        mixed = model(input_ids=IDS).logits
    assert {n: dict(vars(m)) for n, m in model.named_modules()} == before
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i:i + 1], logits_alone(model, name, IDS[i:i + 1]), rtol=1e-5, atol=1e-5)


def test_many_distinct_adapters_take_the_stacked_kernel_and_equal_eachlogits_alone():
    # > 8 distinct adapters in one batch switch the layer to the stacked-ranks kernel: still row i == alone.
    model = make_tiny("llama")
    names = [f"t{k}" for k in range(10)]
    for k, name in enumerate(names):
        inject(model, LoraConfig(r=1 + k % 3, targets=["q_proj", "v_proj"]), name)
        randomize_adapters(model, name, seed=10 + k, std=0.3)
    rows = names + [None, "t3"]
    ids = torch.randint(0, 90, (len(rows), 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), per_row_adapters(model, rows):
        mixed = model(input_ids=ids).logits
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i:i + 1], logits_alone(model, name, ids[i:i + 1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,dtype", [("llama", torch.float32), ("llama", torch.bfloat16), ("gpt2", torch.float32)])
def test_every_row_under_one_choice_equals_that_adapter_alone(kind, dtype):
    # A single stream (or a batch under one adapter) skips the per-row grouping: same logits as set_adapter,
    # on a bf16 base (fp32 adapters) and on GPT-2's fused c_attn, adapted per q/v slice (LoraSlicedLinear).
    model = make_tiny(kind).to(dtype)
    targets = ["q_proj", "v_proj", "down_proj"] if kind == "llama" else ["c_attn", "mlp.c_proj"]
    slices = {"c_attn": [True, False, True]} if kind == "gpt2" else {}
    inject(model, LoraConfig(r=4, targets=targets, slices=slices), "a")
    inject(model, LoraConfig(r=2, targets=targets[:1], slices=slices), "b")
    assert kind == "llama" or type(model.transformer.h[0].attn.c_attn).__name__ == "LoraSlicedLinear"
    randomize_adapters(model, "a", seed=1, std=0.3)
    randomize_adapters(model, "b", seed=2, std=0.3)
    for name in ["a", "b", None]:
        with torch.no_grad(), per_row_adapters(model, [name] * IDS.shape[0]):
            batch = model(input_ids=IDS).logits
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(batch, logits_alone(model, name, IDS), rtol=tol, atol=tol)


def test_low_level_ids_form_and_its_checks():
    model = _two_adapter_llama()
    with torch.no_grad(), adapter_rows(["a", "b"], torch.tensor([1, -1, 0])):
        mixed = model(input_ids=IDS).logits
    for i, name in enumerate(["b", None, "a"]):
        torch.testing.assert_close(mixed[i:i + 1], logits_alone(model, name, IDS[i:i + 1]), rtol=1e-5, atol=1e-5)
    with pytest.raises(LoraConfigError, match=r"adapter ids \[0, 2\]: expected .* \[-1, 2\)"):
        with adapter_rows(["a", "b"], [0, 2]):
            pass


def test_batch_size_must_match_the_names():
    model = _two_adapter_llama()
    with pytest.raises(LoraStateError, match="the batch has 3 rows but 2 adapter names"), torch.no_grad():
        with per_row_adapters(model, ["a", "b"]):
            model(input_ids=IDS)
    with pytest.raises(LoraStateError, match="the batch has 3 rows but 4 adapter names"), torch.no_grad():
        with per_row_adapters(model, ["a", "b", None, "a"]):
            model(input_ids=IDS)
    with pytest.raises(LoraStateError, match="2x the names .* pass expand=True"), torch.no_grad():
        with per_row_adapters(model, ["a", None]):
            model(input_ids=IDS[:2].repeat_interleave(2, 0))


def test_training_mode_with_dropout_is_refused_and_gradients_are_right_without():
    model = _two_adapter_llama(dropout=0.1)
    model.train()
    with pytest.raises(LoraStateError, match=r"training mode and adapters \['a'\] have dropout"):
        with per_row_adapters(model, ["a", "b", None]):
            pass
    model = _two_adapter_llama()
    model.train()
    set_adapter(model, ["a", "b"])  # both trainable
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with per_row_adapters(model, ["a", "b", "a"]):
        model(input_ids=IDS).logits.pow(2).mean().backward()
    mixed = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad()
    for i, name in enumerate(["a", "b", "a"]):  # reference: each row through its adapter alone, grads summed
        set_adapter(model, name)
        (model(input_ids=IDS[i:i + 1]).logits.pow(2).mean() / 3).backward()
    for n, p in params.items():
        torch.testing.assert_close(mixed[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


def test_two_threads_with_different_adapters_never_mix():
    model = _two_adapter_llama()
    expect = {name: logits_alone(model, name, IDS) for name in ("a", "b")}
    barrier, results, errors = threading.Barrier(2), {}, []

    def worker(name):
        try:
            with torch.no_grad(), per_row_adapters(model, [name] * 3):
                outs = []
                for _ in range(8):
                    barrier.wait()  # both threads are inside their blocks, forwards interleave
                    outs.append(model(input_ids=IDS).logits)
            results[name] = outs
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for name in ("a", "b"):
        for out in results[name]:
            torch.testing.assert_close(out, expect[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(num_return_sequences=2, do_sample=False, num_beams=2), dict(num_beams=3)])
def test_generate_with_expanded_batches(kwargs):
    model = _two_adapter_llama()
    prompt = IDS[:2, :3]
    gen = dict(max_new_tokens=4, pad_token_id=0, attention_mask=torch.ones_like(prompt), **kwargs)
    with per_row_adapters(model, ["a", "b"], expand=True):
        mixed = model.generate(prompt, **gen)
    for i, name in enumerate(["a", "b"]):
        set_adapter(model, name)
        alone = model.generate(prompt[i:i + 1], **{**gen, "attention_mask": torch.ones_like(prompt[i:i + 1])})
        k = alone.shape[0]
        assert torch.equal(mixed[i * k:(i + 1) * k], alone)
    with pytest.raises(LoraStateError, match="pass expand=True"), per_row_adapters(model, ["a", "b"]):
        model.generate(prompt, **gen)


def test_torch_compile_traces_lora_layers_whole_and_never_reuses_that_graph_for_per_row_batches():
    # Outside any adapter_rows block the LoRA layers must not break a compiled graph (fullgraph=True raises on
    # a break), and that graph must not serve a per-row batch later: the rows are read from a context variable
    # dynamo cannot trace, so the compiled code is guarded on the count of open blocks and recompiles there.
    model = _two_adapter_llama().eval()
    set_adapter(model, "a")
    eager_a = model(input_ids=IDS).logits.detach()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="eager")  # tracing only, fast
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=IDS).logits, eager_a, rtol=1e-5, atol=1e-5)
        names = ["b", None, "a"]
        expected = torch.stack([logits_alone(model, n, IDS[i:i + 1])[0] for i, n in enumerate(names)])
        loose = torch.compile(model, dynamic=False, backend="eager")
        loose(input_ids=IDS)  # compiled outside a block first
        with per_row_adapters(model, names):
            mixed = loose(input_ids=IDS).logits
    torch._dynamo.reset()
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)
