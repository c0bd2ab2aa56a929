"""Chat data: the label mask on SmolLM2's ChatML template equals one built by hand from the template's
strings (not from apply_chat_template); truncation cuts the prompt, never the answer, and is counted;
the task trains end to end on a tiny Llama given SmolLM2's tokenizer."""

import json

import pytest

from lorakit.train.chat import ChatExample, chat_items, read_chat_jsonl
from lorakit.train.data import DataError, load_task

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
CONV = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Green, like grass."}]


def _hand_built(tok, pieces):
    """ids and labels from (text, trained?) pieces, each tokenized on its own."""
    ids, labels = [], []
    for text, trained in pieces:
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids += t
        labels += t if trained else [-100] * len(t)
    return ids, labels


def test_labels_cover_exactly_the_assistant_answers(smollm2):
    _, tok = smollm2
    (item,), cut = chat_items([ChatExample(CONV)], tok, max_length=512)
    ids, labels = _hand_built(tok, [
        (SYSTEM + "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n", False),
        ("Blue.<|im_end|>", True),
        ("\n<|im_start|>user\nAnother one?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Green, like grass.<|im_end|>", True)])
    assert (item["input_ids"], item["labels"], cut) == (ids, labels, 0)
    assert tok.decode([t for t in item["labels"] if t != -100]) == "Blue.<|im_end|>Green, like grass.<|im_end|>"


def test_truncation_cuts_the_prompt_never_the_answer(smollm2):
    _, tok = smollm2
    (full,), _ = chat_items([ChatExample(CONV)], tok, max_length=512)
    n_answer = len(tok("Green, like grass.<|im_end|>", add_special_tokens=False)["input_ids"])
    items, cut = chat_items([ChatExample(CONV), ChatExample(CONV[:2])], tok, max_length=n_answer + 3)
    assert cut == 2 and items[0]["input_ids"] == full["input_ids"][-(n_answer + 3):]
    assert items[0]["labels"][-n_answer:] == items[0]["input_ids"][-n_answer:]
    with pytest.raises(DataError, match=f"the last answer alone is {n_answer} tokens"):
        chat_items([ChatExample(CONV)], tok, max_length=n_answer - 1)


def test_reader_accepts_messages_and_prompt_completion(tmp_path):
    rows = [{"messages": CONV}, {"prompt": "Hi", "completion": "Hello!"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "dev.jsonl").write_text(json.dumps(rows[1]) + "\n")
    d = load_task("chat", tmp_path)
    assert d.kind == "causal_lm" and d.train[0].messages == CONV
    assert d.dev[0].messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": CONV[:1]}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:1: the last message must be a non-empty assistant answer"):
        read_chat_jsonl(tmp_path / "train.jsonl")


def test_chat_task_trains_a_tiny_llama_and_reports_cuts(smollm2, tmp_path, capfd):
    import transformers as tf

    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import train
    from lorakit.train.report import read_metrics

    _, tok = smollm2
    model_dir = tmp_path / "tiny-llama"
    tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=len(tok), initializer_range=0.2,
                                       eos_token_id=tok.eos_token_id)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"messages": CONV}] + [{"prompt": f"Say {w}.", "completion": f"{w}!"} for w in "abcdefg"]
    for name in ("train.jsonl", "dev.jsonl"):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = TrainConfig(model=str(model_dir), task="chat", data=str(data), out=str(tmp_path / "run"), batch_size=8,
                         max_steps=6, lr=2e-2, warmup_ratio=0.0, max_length=40, threads=1, progress=False)
    train(config)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert len(losses) == 6 and losses[-1] < 0.9 * losses[0]
    assert "chat: 1 of 8 conversations are longer than max_length=40" in capfd.readouterr().err
