"""Generation: lorakit's `generate` with an unmerged adapter is PEFT's generate with the same adapter weights,
token for token (greedy and beam); merged equals unmerged; batched equals one-by-one; stop strings trim."""

import copy

import pytest
import torch
from peft import PeftModel

from lorakit import LoraConfig, inject, merge, save_adapter
from lorakit.generate import compile_for_decoding, generate, load_for_generation, render_prompts, trim_stop
from tests.conftest import randomize_adapters
from tests.train.conftest import bpe_tokenizer

PROMPTS = ["name : The Vaults | eatType : pub ||", "name : Zizzi ||", "area : riverside | food : French | near : x ||",
           "name : Alimentum | priceRange : cheap | customer rating : 5 out of 5 | familyFriendly : no ||"]


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def base(tok):
    """A tiny random Llama over the BPE tokenizer's vocabulary; large init so argmax margins are wide."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=len(tok), initializer_range=0.2,
                            eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    return tf.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def adapted(base, tmp_path_factory):
    """(our model with an all-linear r=4 adapter, B ≠ 0; its saved PEFT-layout directory)."""
    model = inject(copy.deepcopy(base), LoraConfig(r=4, alpha=8, targets="all-linear"))
    randomize_adapters(model, std=0.3)
    path = tmp_path_factory.mktemp("gen-adapter")
    save_adapter(model, path)
    return model.eval(), path


def _peft_generate(base, path, tok, prompts, **options):
    """PEFT's own model and transformers' generate, one prompt at a time (no padding): the reference."""
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    out = []
    for p in prompts:
        ids = tok(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=tok.eos_token_id,
                                      eos_token_id=tok.eos_token_id, **options)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


@pytest.mark.parametrize("num_beams", [1, 3])
def test_unmerged_adapter_generates_as_peft_does(base, adapted, tok, num_beams):
    model, path = adapted
    ours = generate(model, tok, PROMPTS, max_new_tokens=12, num_beams=num_beams, batch_size=1, chat=False)
    ref = _peft_generate(base, path, tok, PROMPTS, max_new_tokens=12, do_sample=False, num_beams=num_beams)
    assert ours == ref
    bare = generate(base, tok, PROMPTS, max_new_tokens=12, num_beams=num_beams, batch_size=1, chat=False)
    assert bare != ours  # the adapter really changes the text


def test_merged_and_batched_equal_unmerged_one_by_one(adapted, tok):
    model, _ = adapted
    single = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=1, chat=False)
    assert generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=4, chat=False) == single
    merged = merge(copy.deepcopy(model))
    assert generate(merged, tok, PROMPTS, max_new_tokens=12, batch_size=3, chat=False) == single
    assert tok.padding_side == "right" and tok.pad_token is None  # the tokenizer is left as it was


def test_stop_strings_trim_and_sampling_is_seeded(base, tok):
    full = generate(base, tok, PROMPTS[:2], max_new_tokens=16, chat=False)
    stop = full[0][3:6]  # a piece of the greedy text that is certainly produced
    cut = generate(base, tok, PROMPTS[:2], max_new_tokens=16, stop=[stop], chat=False)
    assert cut[0] == full[0][:full[0].find(stop)] and cut[0] != full[0]
    a = generate(base, tok, PROMPTS, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, seed=3, chat=False)
    b = generate(base, tok, PROMPTS, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, seed=3, chat=False)
    c = generate(base, tok, PROMPTS, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, seed=4, chat=False)
    assert a == b and a != c


def test_trim_stop_and_chat_rendering(smollm2):
    assert trim_stop("a. b. c", [". c", ". "]) == "a" and trim_stop("abc", []) == "abc"
    _, tokenizer = smollm2
    (text,) = render_prompts(tokenizer, ["Hi"], chat=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="chat=False takes string prompts"):
        render_prompts(tokenizer, [[{"role": "user", "content": "Hi"}]], chat=False)



def test_static_cache_and_a_compiled_step_give_the_dynamic_cache_tokens(adapted, tok):
    # generate(static_cache=True) is what a compiled model needs; greedy tokens must not change with it, nor with
    # the forward traced by torch.compile (the "eager" backend traces the graph and runs it without a C compiler).
    model = copy.deepcopy(adapted[0])
    want = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=2)
    assert generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=2, static_cache=True) == want
    torch._dynamo.reset()
    compile_for_decoding(model, backend="eager")
    try:
        assert generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=2, static_cache=True) == want
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_weights_for_generation_and_refused_with_merge(base, adapted, tmp_path, weights):
    from lorakit import LoraConfigError
    from lorakit.quant import Int4Linear, Int8Linear

    tok_dir = tmp_path / "base"
    base.save_pretrained(tok_dir)
    bpe_tokenizer().save_pretrained(tok_dir)
    net, _, _ = load_for_generation(str(tok_dir), adapted[1], weights=weights)
    kind, dtype = (Int8Linear, torch.int8) if weights == "int8" else (Int4Linear, torch.uint8)
    layers = [m for m in net.modules() if isinstance(m, kind)]
    assert layers and all(m.weight.dtype == dtype for m in layers)
    with pytest.raises(LoraConfigError, match=f"--merge or --weights {weights}"):
        load_for_generation(str(tok_dir), adapted[1], merge=True, weights=weights)
