"""Embeddings (float and base64, the SDK's default) and classification (single sentences and pairs) on a tiny
BERT with classifier adapters saved by lorakit, against PEFT loading the same files."""

import base64
import json

import httpx
import numpy as np
import openai
import pytest
import torch

from tests.conftest import randomize_adapters
from tests.serve.conftest import start

TEXTS = ["a gripping , beautifully acted film .", "a dull mess .", "fine"]


def save_classifier_adapter(bert_dir: str, out, seed: int, bias: str = "none", head: bool = True) -> None:
    from transformers import AutoModelForSequenceClassification

    import lorakit

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=2)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets=["query", "value"],
                                             modules_to_save=["classifier"] if head else [], bias=bias))
    randomize_adapters(model, std=0.3, seed=seed)
    lorakit.save_adapter(model, out)


@pytest.fixture(scope="module")
def enc(bert_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bert-adapters")
    save_classifier_adapter(bert_dir, root / "c0", 1)
    save_classifier_adapter(bert_dir, root / "run1" / "adapter", 2)  # a `lorakit train` run directory
    save_classifier_adapter(bert_dir, root / "biased", 3, bias="all")
    save_classifier_adapter(bert_dir, root / "nohead", 4, head=False)
    (root / "run1" / "task.json").write_text(json.dumps({"kind": "classification", "labels": ["neg", "pos"]}))
    s = start(bert_dir, root)
    s.adapters_root = root
    yield s
    s.close()


def peft_model(bert_dir, adapter):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=2)
    return (PeftModel.from_pretrained(model, str(adapter)) if adapter else model).eval()


def tokens(bert_dir, first, second=None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bert_dir)(first, second, padding=True, return_tensors="pt")


def test_classify_equals_peft_with_labels_and_pairs(enc, bert_dir):
    pairs = [["a man plays guitar .", "someone makes music ."], ["it rains .", "the sun is out ."]]
    for name, adapter, given, labels in [("c0", enc.adapters_root / "c0", TEXTS, None),
                                         ("run1", enc.adapters_root / "run1" / "adapter", pairs, ["neg", "pos"])]:
        model = peft_model(bert_dir, adapter)
        inputs = tokens(bert_dir, *(zip(*given, strict=True) if isinstance(given[0], list) else (given,)))
        with torch.no_grad():
            want = torch.softmax(model(**{k: v for k, v in inputs.items()}).logits, -1)
        r = httpx.post(f"{enc.url}/classify", json={"model": name, "input": given}, timeout=30)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        got = torch.tensor([d["probs"] for d in data])
        assert torch.allclose(got, want, atol=1e-5)
        names = labels or ["LABEL_0", "LABEL_1"]
        assert [d["label"] for d in data] == [names[int(i)] for i in want.argmax(-1)]
    base = httpx.post(f"{enc.url}/classify", json={"model": enc.server.settings.base_id, "input": "x"})
    assert base.status_code == 400 and base.json()["error"]["code"] == "wrong_task"


def test_embeddings_float_and_base64_equal_peft_mean_pooled(enc, bert_dir):
    inputs = tokens(bert_dir, TEXTS)
    model = peft_model(bert_dir, enc.adapters_root / "c0")
    with torch.no_grad():
        hidden = model.base_model.model.bert(**inputs).last_hidden_state
    m = inputs["attention_mask"].unsqueeze(-1).float()
    want = ((hidden * m).sum(1) / m.sum(1)).numpy()
    client = openai.OpenAI(base_url=enc.url, api_key="x", max_retries=0)
    default = client.embeddings.create(model="c0", input=TEXTS)  # the SDK asks for base64 and decodes it
    floats = client.embeddings.create(model="c0", input=TEXTS, encoding_format="float")
    for resp in (default, floats):
        got = np.array([d.embedding for d in resp.data])
        np.testing.assert_allclose(got, want, atol=1e-5)
    raw = httpx.post(f"{enc.url}/embeddings", json={"model": "c0", "input": TEXTS[0], "encoding_format": "base64"})
    vec = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, want[0], atol=1e-5)
    assert default.usage.prompt_tokens == int(inputs["attention_mask"].sum())


def test_completions_on_an_encoder_is_400(enc):
    r = httpx.post(f"{enc.url}/completions", json={"model": "c0", "prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_task"


def test_demo_helper_classifies_a_run_over_http(enc, bert_dir):
    from lorakit.serve.demo import classify_over_http

    answers, command = classify_over_http(enc.adapters_root / "run1", TEXTS[:2], model=bert_dir)
    model = peft_model(bert_dir, enc.adapters_root / "run1" / "adapter")
    with torch.no_grad():
        want = torch.softmax(model(**tokens(bert_dir, TEXTS[:2])).logits, -1)
    assert [a["label"] for a in answers] == [["neg", "pos"][int(i)] for i in want.argmax(-1)]
    torch.testing.assert_close(torch.tensor([a["probs"] for a in answers]), want, rtol=1e-5, atol=1e-5)
    assert command.startswith("lorakit serve --model ") and str(enc.adapters_root) in command


def test_an_adapter_that_trains_shared_biases_is_refused(enc):
    r = httpx.post(f"{enc.url}/classify", json={"model": "biased", "input": "x"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_invalid"
    assert "bias='all'" in r.json()["error"]["message"]
    assert httpx.post(f"{enc.url}/classify", json={"model": "c0", "input": "x"}, timeout=30).status_code == 200


def test_concurrent_classify_requests_share_forwards_and_stay_apart(enc, bert_dir):
    """Requests for different adapters arriving together are stacked into one forward (rows per adapter);
    each answer equals PEFT with that request's adapter alone."""
    import asyncio

    want = {}
    for name in ("c0", "run1"):
        path = enc.adapters_root / name / ("adapter" if name == "run1" else "")
        with torch.no_grad():
            want[name] = torch.softmax(peft_model(bert_dir, path)(**tokens(bert_dir, TEXTS)).logits, -1)

    async def main():
        async with httpx.AsyncClient(timeout=30) as client:
            work = [("c0", i) if k % 2 else ("run1", i) for k in range(12) for i in [k % 3]]
            rs = await asyncio.gather(*[client.post(f"{enc.url}/classify", json={"model": m, "input": TEXTS[i]})
                                        for m, i in work])
            return work, [r.json()["data"][0]["probs"] for r in rs]

    def distinct() -> tuple[float, float]:
        lines = httpx.get(f"{enc.root}/metrics").text.splitlines()
        get = lambda k: float(next(x.split()[-1] for x in lines if x.startswith(k)))  # noqa: E731
        return get("lorakit_batch_distinct_adapters_sum"), get("lorakit_batch_distinct_adapters_count")

    before = distinct()
    work, probs = asyncio.run(main())
    after = distinct()
    assert after[0] - before[0] > after[1] - before[1], "no forward mixed the two adapters"
    for (name, i), p in zip(work, probs, strict=True):
        torch.testing.assert_close(torch.tensor(p), want[name][i], rtol=1e-5, atol=1e-5)


def test_classify_with_an_adapter_without_a_head_is_400(enc):
    r = httpx.post(f"{enc.url}/classify", json={"model": "nohead", "input": "x"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_task" and "head" in r.json()["error"]["message"]
    e = openai.OpenAI(base_url=enc.url, api_key="x").embeddings.create(model="nohead", input="x")
    assert len(e.data[0].embedding) == 32  # embeddings work with it
