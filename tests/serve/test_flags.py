"""`lorakit serve` flags and threads: --threads reaches torch, a bad value is refused before anything loads; the
model loads on a thread that ends, the loaders run torch single-threaded, the engine thread with --threads."""

import argparse

import pytest
import torch

from lorakit.errors import LoraConfigError
from lorakit.serve.flags import add_serve_flags, config_from_flags
from lorakit.serve.server import build
from tests.serve.conftest import start


def _parse(*argv):
    p = argparse.ArgumentParser()
    add_serve_flags(p)
    return config_from_flags(p.parse_args(["--model", "m", "--adapters", "a", *argv]))


def test_threads_flag_default_and_value():
    assert _parse().threads == 0 and _parse("--threads", "1").threads == 1


def test_negative_threads_refused_before_loading(tmp_path):
    with pytest.raises(LoraConfigError, match="--threads -1"):
        build(_parse("--threads", "-1"))  # model "m" does not exist: the check must come first


def test_threads_set_torch_for_the_server(llama_dir, llama_adapters):
    before = torch.get_num_threads()
    srv = start(llama_dir, llama_adapters, threads=1)
    try:
        assert torch.get_num_threads() == 1
    finally:
        srv.close()
        torch.set_num_threads(before)


def test_torch_work_stays_on_the_engine_thread(llama_dir, llama_adapters, monkeypatch):
    # One OpenMP pool in the process (lorakit/serve/threads.py): the model loads on a thread that
    # has ended once build returns; loaders use 1 torch thread; the engine thread gets the configured count.
    import threading

    from lorakit.serve import server as server_module

    loaded_on = []
    real = server_module.load_base
    monkeypatch.setattr(server_module, "load_base",
                        lambda *a, **k: (loaded_on.append(threading.current_thread()), real(*a, **k))[1])
    before = torch.get_num_threads()
    srv = start(llama_dir, llama_adapters, threads=2)
    try:
        engine = srv.server.engine
        assert len(loaded_on) == 1 and loaded_on[0] is not threading.main_thread()
        assert not loaded_on[0].is_alive()
        assert engine.loader.submit(torch.get_num_threads).result(timeout=10) == 1
        assert engine.call(torch.get_num_threads).result(timeout=10) == 2
        assert engine.call(threading.current_thread).result(timeout=10) is engine.thread
    finally:
        srv.close()
        torch.set_num_threads(before)
