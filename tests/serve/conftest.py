"""A tiny random Llama (and tiny BERT) saved as model directories, PEFT-format adapters saved by lorakit, and a
real uvicorn server on 127.0.0.1 (a free port, in a thread) to drive with the official openai SDK."""

from pathlib import Path

import pytest
import torch

from tests.train.conftest import bpe_tokenizer, save_tiny_bert

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
LLAMA_ADAPTERS = [f"a{i}" for i in range(9)]


def llama_config(vocab: int, eos: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128, initializer_range=0.2,
                       eos_token_id=eos, bos_token_id=eos, pad_token_id=eos)


def save_llama_adapter(model_dir: str, out: Path, seed: int, targets=("q_proj", "v_proj")) -> Path:
    """A LoRA adapter on the tiny Llama with random nonzero A and B, saved by lorakit in PEFT's format."""
    from transformers import AutoModelForCausalLM

    import lorakit
    from tests.conftest import randomize_adapters

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets=list(targets)))
    randomize_adapters(model, std=0.4, seed=seed)
    return lorakit.save_adapter(model, out)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> str:
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = bpe_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(len(tok), tok.eos_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def llama_adapters(llama_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llama-adapters")
    for i, name in enumerate(LLAMA_ADAPTERS):
        save_llama_adapter(llama_dir, root / name, seed=100 + i)
    return root


def start(model: str, adapters, **kw):
    from lorakit.serve.server import ServeConfig, ThreadedServer, free_port

    return ThreadedServer(ServeConfig(model=model, adapters=str(adapters), port=free_port(), timeout=30, **kw))


@pytest.fixture(scope="module")
def llama_server(llama_dir, llama_adapters):
    srv = start(llama_dir, llama_adapters, max_loaded=16, max_batch=32)
    yield srv
    srv.close()


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> str:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-serve"))


def peft_greedy(model_dir: str, adapter_dir, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """The independent reference: PEFT loads the adapter, merges it, and transformers' generate runs greedy."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    eos, outs = model.config.eos_token_id, []
    for prompt in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=max_new, do_sample=False)
        new = out[0, len(prompt):].tolist()
        outs.append(new[:new.index(eos)] if eos in new else new)
    return outs


def adapted_tiny_llama(targets: list[str]):
    """A tiny random Llama carrying adapters "x" and "y" (random nonzero factors on `targets`), and the independent
    references: per choice (x, y, None = the base) a separate model with that adapter merged into dense weights."""
    import copy

    import lorakit
    from tests.conftest import make_tiny, randomize_adapters

    model = make_tiny("llama").eval()
    for k, name in enumerate(["x", "y"]):
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets=targets), name)
        randomize_adapters(model, name, std=0.3, seed=k)
    refs = {}
    for name in ["x", "y"]:
        m = copy.deepcopy(model)
        lorakit.set_adapter(m, name)
        refs[name] = lorakit.merge_and_unload(m)
    base = copy.deepcopy(model)
    for name in ["x", "y"]:
        lorakit.delete_adapter(base, name)
    refs[None] = base
    return model, refs


def prefill_rows(model, group: list[tuple[list[int], str | None]]):
    """Prefill (prompt, adapter) rows left-padded in one forward, as the engine does: (its KVBatch, last logits)."""
    import lorakit
    from lorakit.serve.kv import GrowingCache, KVBatch, left_pad

    ids, mask, pos = left_pad([p for p, _ in group], 0)
    with lorakit.per_row_adapters(model, [a for _, a in group]):
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=GrowingCache())
    return KVBatch(out.past_key_values, mask, [len(p) for p, _ in group]), out.logits[:, -1]
