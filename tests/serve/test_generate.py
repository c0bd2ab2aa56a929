"""Completions and chat through the official openai SDK against a real server on 127.0.0.1: mixed adapters in
concurrent batches equal PEFT's merged greedy generation token for token; streaming equals non-streaming."""

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer

from tests.serve.conftest import LLAMA_ADAPTERS, peft_greedy

PROMPTS = ["name : The Eagle | food : Chinese", "area : riverside", "The Mill is a pub"]
CACHE_PROMPT = "eatType : coffee shop"  # asked only by the prompt-cache test
MAX_NEW = 8


@pytest.fixture(scope="module")
def tok(llama_dir):
    return AutoTokenizer.from_pretrained(llama_dir)


@pytest.fixture(scope="module")
def reference(llama_dir, llama_adapters, tok):
    """(model, prompt) -> PEFT's greedy text, for the base and every adapter."""
    base = llama_dir.rstrip("/").split("/")[-1]
    out = {}
    for name in [base] + LLAMA_ADAPTERS:
        adapter = None if name == base else llama_adapters / name
        prompts = PROMPTS + [CACHE_PROMPT] if name in ("a6", "a7") else PROMPTS
        for p, ids in zip(prompts, peft_greedy(llama_dir, adapter, [tok(p)["input_ids"] for p in prompts], MAX_NEW),
                          strict=True):
            out[name, p] = tok.decode(ids, skip_special_tokens=True)
    return out


def base_id(llama_dir) -> str:
    return llama_dir.rstrip("/").split("/")[-1]


def test_models_lists_base_and_every_adapter(llama_server, llama_dir, llama_adapters):
    models = openai.OpenAI(base_url=llama_server.url, api_key="x").models.list().data
    ids = [m.id for m in models]
    assert ids == [base_id(llama_dir)] + LLAMA_ADAPTERS
    a0 = next(m for m in models if m.id == "a0")
    assert a0.object == "model" and a0.parent == base_id(llama_dir) and a0.root == str(llama_adapters / "a0")
    assert models[0].parent is None


def test_concurrent_mixed_adapters_equal_peft_alone(llama_server, llama_dir, reference):
    """27 concurrent requests over 9 adapters and the base: every answer is its own adapter's greedy output."""
    client = openai.OpenAI(base_url=llama_server.url, api_key="x", timeout=30, max_retries=0)
    names = [base_id(llama_dir)] + LLAMA_ADAPTERS
    work = [(m, p) for p in PROMPTS for m in names]

    def ask(item):
        r = client.completions.create(model=item[0], prompt=item[1], max_tokens=MAX_NEW, temperature=0)
        return r.choices[0].text, r.usage.completion_tokens

    with ThreadPoolExecutor(len(work)) as pool:
        answers = list(pool.map(ask, work))
    for item, (text, _) in zip(work, answers, strict=True):
        assert text == reference[item], item
    distinct = _histogram(llama_server, "lorakit_batch_distinct_adapters")
    assert distinct["sum"] > distinct["count"], "no decode step mixed adapters"


def test_async_client_mixed(llama_server, llama_dir, reference):
    async def main():
        client = openai.AsyncOpenAI(base_url=llama_server.url, api_key="x", timeout=30, max_retries=0)
        work = [(m, PROMPTS[1]) for m in LLAMA_ADAPTERS[:8] + [base_id(llama_dir)]]
        rs = await asyncio.gather(*[client.completions.create(model=m, prompt=p, max_tokens=MAX_NEW, temperature=0)
                                    for m, p in work])
        return work, [r.choices[0].text for r in rs]

    work, texts = asyncio.run(main())
    assert texts == [reference[w] for w in work]


def test_streaming_equals_non_streaming(llama_server, reference):
    client = openai.OpenAI(base_url=llama_server.url, api_key="x", timeout=30, max_retries=0)
    chunks = list(client.completions.create(model="a3", prompt=PROMPTS[0], max_tokens=MAX_NEW, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference["a3", PROMPTS[0]]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    raw = httpx.post(f"{llama_server.url}/completions", json={"model": "a3", "prompt": PROMPTS[0], "max_tokens": 3,
                                                              "stream": True}, timeout=30).text
    events = [e for e in raw.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_uses_the_tokenizer_template(llama_server, llama_dir, llama_adapters, tok):
    messages = [{"role": "user", "content": "name : The Eagle"}]
    prompt = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False)["input_ids"]
    want = tok.decode(peft_greedy(llama_dir, llama_adapters / "a5", [prompt], MAX_NEW)[0], skip_special_tokens=True)
    client = openai.OpenAI(base_url=llama_server.url, api_key="x", timeout=30, max_retries=0)
    r = client.chat.completions.create(model="a5", messages=messages, max_tokens=MAX_NEW, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(prompt)
    stream = client.chat.completions.create(model="a5", messages=messages, max_tokens=MAX_NEW, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want


def test_sampling_seed_n_and_stop(llama_server, reference):
    client = openai.OpenAI(base_url=llama_server.url, api_key="x", timeout=30, max_retries=0)
    kw = {"model": "a1", "prompt": PROMPTS[2], "max_tokens": 6, "temperature": 1.0, "top_p": 0.9, "seed": 7, "n": 3}
    one, two = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in one.choices] == [c.text for c in two.choices]
    assert [c.index for c in one.choices] == [0, 1, 2] and len({c.text for c in one.choices}) > 1
    full = reference["a2", PROMPTS[0]]
    stop = full[3:5]
    r = client.completions.create(model="a2", prompt=PROMPTS[0], max_tokens=MAX_NEW, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_prompt_cache_is_keyed_by_adapter(llama_server, reference):
    """The same prompt under another adapter never reuses KV computed under the first one."""
    client = openai.OpenAI(base_url=llama_server.url, api_key="x", timeout=30, max_retries=0)
    prompt = CACHE_PROMPT

    def ask(m):
        return client.completions.create(model=m, prompt=prompt, max_tokens=MAX_NEW, temperature=0).choices[0].text

    ask("a6")
    hits = _counter(llama_server, "lorakit_prompt_cache_hits_total")
    assert ask("a7") == reference["a7", prompt]  # same tokens, other adapter: no hit
    assert _counter(llama_server, "lorakit_prompt_cache_hits_total") == hits
    assert ask("a6") == reference["a6", prompt]  # same tokens, same adapter: a hit, same answer
    assert _counter(llama_server, "lorakit_prompt_cache_hits_total") == hits + 1


def _metrics(server) -> str:
    return httpx.get(f"{server.root}/metrics", timeout=10).text


def _counter(server, name: str) -> float:
    return sum(float(line.split()[-1]) for line in _metrics(server).splitlines()
               if line.startswith(name) and not line.startswith("#"))


def _histogram(server, name: str) -> dict[str, float]:
    text = _metrics(server)
    get = lambda suffix: float(next(line.split()[-1] for line in text.splitlines()  # noqa: E731
                                    if line.startswith(name + suffix)))
    return {"sum": get("_sum"), "count": get("_count")}


def test_metrics_per_adapter_series(llama_server):
    client = openai.OpenAI(base_url=llama_server.url, api_key="x", timeout=30, max_retries=0)
    series = ['lorakit_requests_total{model="a8"}', 'lorakit_request_errors_total{code="400",model="a8"}',
              'lorakit_time_to_first_token_seconds_count{model="a8"}',
              'lorakit_request_latency_seconds_count{model="a8"}',
              'lorakit_prompt_tokens_total{model="a8"}', 'lorakit_generation_tokens_total{model="a8"}',
              "lorakit_adapter_cache_hits_total"]
    before = {k: _value(llama_server, k) for k in series}
    r = client.completions.create(model="a8", prompt=PROMPTS[0], max_tokens=3, temperature=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="a8", prompt=PROMPTS[0], max_tokens=100000)
    delta = {k: _value(llama_server, k) - before[k] for k in series}
    assert list(delta.values()) == [1, 1, 1, 1, r.usage.prompt_tokens, r.usage.completion_tokens, 1]
    text = _metrics(llama_server)
    assert "lorakit_queue_depth 0.0" in text and "lorakit_adapter_loads_total 9.0" in text


def _value(server, series: str) -> float:
    return next((float(line.split()[-1]) for line in _metrics(server).splitlines() if line.startswith(series + " ")),
                0.0)


def test_embeddings_of_the_llm_are_mean_pooled_decoder_states(llama_server, llama_dir, llama_adapters, tok):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(llama_adapters / "a4"))
    ids = tok(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        want = model.base_model.model.model(**ids).last_hidden_state.mean(1)[0]
    got = openai.OpenAI(base_url=llama_server.url, api_key="x").embeddings.create(model="a4", input=PROMPTS[0])
    torch.testing.assert_close(torch.tensor(got.data[0].embedding), want, rtol=1e-5, atol=1e-5)


def test_a_single_stream_decodes_through_its_adapters_plan_and_equals_peft(llama_server, reference, monkeypatch):
    # Every row of each decode step uses a3: the engine holds a3's decode plan around the step (step_plans.py).
    from lorakit.decode_plan import PlanEntry

    taken, real = [], PlanEntry.__call__

    def counting(self, x):
        y = real(self, x)
        taken.append(y is not None)
        return y

    monkeypatch.setattr(PlanEntry, "__call__", counting)
    client = openai.OpenAI(base_url=llama_server.url, api_key="x", timeout=30, max_retries=0)
    r = client.completions.create(model="a3", prompt=PROMPTS[2], max_tokens=MAX_NEW, temperature=0)
    assert r.choices[0].text == reference["a3", PROMPTS[2]]
    assert len(taken) >= MAX_NEW - 1 and all(taken)  # decode steps only; none fell back to the per-row path
