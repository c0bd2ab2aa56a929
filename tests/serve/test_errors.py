"""Bad input, overload, timeouts, auth and broken adapter files: each gets a clear OpenAI-shaped error, and the
server keeps serving after every one."""

import shutil
import threading
import time

import httpx
import openai
import pytest

from tests.serve.conftest import start

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def srv(llama_dir, llama_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("err-adapters")
    for name in ("a0", "a1"):
        shutil.copytree(llama_adapters / name, root / name)
    shutil.copytree(llama_adapters / "a2", root / "broken")
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(llama_adapters / "a3", outside / "a3")
    (root / "escape").symlink_to(outside / "a3")
    s = start(llama_dir, root, api_key=KEY, max_body=4096)
    s.outside = outside
    yield s
    s.close()


def post(srv, path, body, **kw):
    return httpx.post(f"{srv.url}{path}", json=body, headers=AUTH, timeout=30, **kw)


def ok(srv) -> None:
    """The server still answers a normal request."""
    r = post(srv, "/completions", {"model": "a0", "prompt": "area : riverside", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def err(r, status, code=None):
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    if code is not None:
        assert e["code"] == code
    return e


def test_auth(srv):
    assert httpx.get(f"{srv.root}/health").status_code == 200  # open
    err(httpx.get(f"{srv.url}/models"), 401, "invalid_api_key")
    err(httpx.get(f"{srv.url}/models", headers={"Authorization": "Bearer nope"}), 401)
    err(httpx.get(f"{srv.root}/metrics"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.url, api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{srv.url}/models", headers=AUTH).status_code == 200


def test_unknown_adapter_is_404_model_not_found(srv):
    client = openai.OpenAI(base_url=srv.url, api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert e.value.code == "model_not_found" and "The model `nope` does not exist." in e.value.message
    ok(srv)


@pytest.mark.parametrize("body", [b"{not json", b'{"model": "a0"}', b'{"model": "a0", "prompt": "x", "n": 0}',
                                  b'{"model": "a0", "prompt": "x", "temperature": "hot"}', b"[1, 2]"])
def test_malformed_body_is_400(srv, body):
    r = httpx.post(f"{srv.url}/completions", content=body, headers={**AUTH, "content-type": "application/json"})
    err(r, 400)
    ok(srv)


@pytest.mark.parametrize("name", ["../a0", "a0/..", "a b", "x/y", ".."])
def test_unsafe_adapter_names_are_400(srv, name):
    err(post(srv, "/completions", {"model": name, "prompt": "x", "max_tokens": 2}), 400)
    ok(srv)


def test_symlink_out_of_the_adapters_dir_is_400(srv):
    err(post(srv, "/completions", {"model": "escape", "prompt": "x", "max_tokens": 2}), 400, "path_not_allowed")
    e = err(post(srv, "/load_lora_adapter", {"lora_name": "out", "lora_path": str(srv.outside / "a3")}), 400,
            "path_not_allowed")
    assert e["param"] == "lora_path"
    ok(srv)


def test_length_limits(srv):
    long_prompt = list(range(1, 130))  # the tiny Llama's context is 128
    err(post(srv, "/completions", {"model": "a0", "prompt": long_prompt, "max_tokens": 2}), 400,
        "context_length_exceeded")
    err(post(srv, "/completions", {"model": "a0", "prompt": "x", "max_tokens": 500}), 400, "max_tokens_exceeded")
    err(post(srv, "/completions", {"model": "a0", "prompt": "x" * 5000}), 413)
    ok(srv)


def test_wrong_task_for_the_base_is_400(srv):
    err(post(srv, "/classify", {"model": "a0", "input": "a fine film"}), 400, "wrong_task")
    ok(srv)


def test_broken_adapter_file_fails_its_request_only(srv):
    e = err(post(srv, "/completions", {"model": "broken", "prompt": "x", "max_tokens": 2}), 400, "adapter_invalid")
    assert "broken" in e["message"] and "adapter_model.safetensors" in e["message"]
    ok(srv)
    assert "lorakit_adapter_load_failures_total 1.0" in httpx.get(f"{srv.root}/metrics", headers=AUTH).text


def test_full_queue_is_429_with_retry_after(srv):
    engine = srv.server.engine
    engine.max_queue = 1
    try:
        t = threading.Thread(target=post, args=(srv, "/completions", {"model": "a1", "prompt": "x", "max_tokens": 120,
                                                                       "n": 8, "temperature": 0}))
        t.start()
        deadline = time.monotonic() + 10
        while engine.idle() and time.monotonic() < deadline:
            time.sleep(0.005)
        r = post(srv, "/completions", {"model": "a0", "prompt": "x", "max_tokens": 2})
        err(r, 429, "queue_full")
        assert r.headers["retry-after"] == "1"
        t.join(30)
    finally:
        engine.max_queue = 256
    ok(srv)


def test_timeout_is_408_and_cancels(srv):
    settings = srv.server.settings
    settings.timeout = 0.05
    try:
        err(post(srv, "/completions", {"model": "a1", "prompt": "x", "max_tokens": 120, "n": 8,
                                             "temperature": 0}), 408,
            "timeout")
    finally:
        settings.timeout = 30
    deadline = time.monotonic() + 10
    while not srv.server.engine.idle() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.server.engine.idle() and not srv.server.engine.running
    ok(srv)
