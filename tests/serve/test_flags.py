"""`lorakit serve` flags: --threads reaches torch, a bad value is refused before anything loads."""

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
