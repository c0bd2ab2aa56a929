"""Adapters at run time: vLLM's load/unload bodies, unload frees the tensors (measured), LRU eviction, a name
reloaded from another file serves that file, a slow load never stalls other adapters, a client that disconnects
mid-stream cancels, SIGTERM drains."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from safetensors import safe_open

from lorakit.serve.server import free_port
from tests.serve.conftest import peft_greedy, start


@pytest.fixture(scope="module")
def srv(llama_dir, llama_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("rt-adapters")
    for name in ("a0", "a1", "a2"):
        shutil.copytree(llama_adapters / name, root / name)
    shutil.copytree(llama_adapters / "a4", root / "spare" / "a4")  # loadable only by path
    s = start(llama_dir, root, max_loaded=2)
    s.adapters_root = root
    yield s
    s.close()


def complete(srv, model, max_tokens=3, **kw):
    r = httpx.post(f"{srv.url}/completions", json={"model": model, "prompt": "area : riverside",
                                                    "max_tokens": max_tokens, "temperature": 0, **kw}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def file_bytes(path: Path) -> int:
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_load_unload_frees_the_adapter_tensors(srv):
    model = srv.server.engine.model
    complete(srv, "a0")  # the model has LoRA layers already; what remains is the new adapter's cost
    before = param_bytes(model)
    r = httpx.post(f"{srv.url}/load_lora_adapter", json={"lora_name": "x4", "lora_path": "spare/a4"}, timeout=30)
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'x4' added successfully."
    assert param_bytes(model) - before == file_bytes(srv.adapters_root / "spare" / "a4")
    assert "x4" in [m.id for m in openai.OpenAI(base_url=srv.url, api_key="x").models.list().data]
    assert complete(srv, "x4")
    again = httpx.post(f"{srv.url}/load_lora_adapter", json={"lora_name": "x4", "lora_path": "spare/a4"})
    assert again.status_code == 400  # vLLM: a loaded name without load_inplace
    r = httpx.post(f"{srv.url}/unload_lora_adapter", json={"lora_name": "x4"}, timeout=30)
    assert r.status_code == 200
    freed = int(r.text.split("(")[1].split()[0])
    assert freed == file_bytes(srv.adapters_root / "spare" / "a4") and param_bytes(model) == before
    assert httpx.post(f"{srv.url}/unload_lora_adapter", json={"lora_name": "x4"}).status_code == 404
    assert httpx.post(f"{srv.url}/completions", json={"model": "x4", "prompt": "x"}).status_code == 404
    assert httpx.post(f"{srv.url}/load_lora_adapter", json={"lora_name": "x4"}).status_code == 400


def test_lru_evicts_beyond_max_loaded(srv):
    registry = srv.server.registry
    for name in ("a0", "a1", "a2", "a0"):
        complete(srv, name)
    assert list(registry.loaded) == ["a2", "a0"]  # a1 was least recently used
    text = httpx.get(f"{srv.root}/metrics").text
    assert "lorakit_adapter_evictions_total" in text and "lorakit_adapter_evictions_total 0.0" not in text


def test_a_name_loaded_again_from_another_file_serves_that_file_in_mixed_batches(srv, llama_dir, llama_adapters):
    """Decode steps read adapters from slot tables: unload and install must drop the old file's slot."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir)
    prompt = "name : The Eagle | food : Chinese"
    shutil.copytree(llama_adapters / "a5", srv.adapters_root / "spare" / "a5")
    client = openai.OpenAI(base_url=srv.url, api_key="x", timeout=30, max_retries=0)

    def mixed():  # "y" beside another adapter, concurrently: rows of two adapters share decode steps
        with ThreadPoolExecutor(3) as pool:
            texts = list(pool.map(lambda m: client.completions.create(model=m, prompt=prompt, max_tokens=8,
                                                                       temperature=0).choices[0].text,
                                  ["y", "a0", "y"]))
        assert texts[0] == texts[2]
        return texts[0]

    for spare in ("a4", "a5"):
        r = httpx.post(f"{srv.url}/load_lora_adapter", json={"lora_name": "y", "lora_path": f"spare/{spare}"},
                       timeout=30)
        assert r.status_code == 200, r.text
        want = tok.decode(peft_greedy(llama_dir, llama_adapters / spare, [tok(prompt)["input_ids"]], 8)[0],
                          skip_special_tokens=True)
        assert mixed() == want
        assert "y" in srv.server.engine.tables.slot  # the steps held "y" in the tables
        assert httpx.post(f"{srv.url}/unload_lora_adapter", json={"lora_name": "y"}, timeout=30).status_code == 200
        assert "y" not in srv.server.engine.tables.slot


def test_a_slow_load_does_not_stall_other_adapters(srv):
    registry, real = srv.server.registry, srv.server.registry.plan
    done: dict[str, float] = {}

    def slow_plan(model, name, path, lock):
        if name == "a1":
            time.sleep(1.5)
        return real(model, name, path, lock)

    registry.plan = slow_plan
    try:
        complete(srv, "a0")
        start_t = time.monotonic()
        slow = threading.Thread(target=lambda: (complete(srv, "a1"), done.setdefault("a1", time.monotonic())))
        slow.start()
        time.sleep(0.1)
        complete(srv, "a0", max_tokens=4)
        done["a0"] = time.monotonic()
        slow.join(30)
    finally:
        registry.plan = real
    assert done["a0"] - start_t < 1.5 < done["a1"] - start_t


def test_disconnect_mid_stream_cancels(srv):
    engine = srv.server.engine
    before = engine.metrics.cancelled._value.get()
    body = {"model": "a0", "prompt": "x", "max_tokens": 120, "n": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{srv.url}/completions", json=body, timeout=30) as r:
        next(r.iter_lines())
    deadline = time.monotonic() + 10
    while not engine.idle() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.idle() and engine.metrics.cancelled._value.get() == before + 1
    assert engine.metrics.generated_tokens.labels("a0")._value.get() >= 0  # no generation was counted as done


def test_sigterm_drains(llama_dir, srv):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", llama_dir, "--adapters",
                             str(srv.adapters_root), "--port", str(port), "--max-batch", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        # 4 prompts x n=4 = 16 rows through a batch of 2: ~960 decode steps, seconds of work still running
        body = {"model": "a2", "prompt": ["x", "y", "z", "w"], "n": 4, "max_tokens": 120, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
            assert httpx.get(f"{url}/health").status_code == 503
            late = httpx.post(f"{url}/v1/completions", json={"model": "a0", "prompt": "x", "max_tokens": 2})
            assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        finished = [json.loads(e[6:])["choices"][0] for e in rest[:-1]]
        assert sorted(c["index"] for c in finished if c["finish_reason"]) == list(range(16))
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
