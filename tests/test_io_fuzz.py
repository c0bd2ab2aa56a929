"""Fuzzing adapter files: every mutated file either loads as a valid adapter or raises AdapterFileError —
no other exception, no hang (a 5 s alarm per load), and a failed load leaves the model exactly as it was."""

import json
import os
import signal
import tempfile
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit import AdapterFileError, load_adapter, save_adapter
from lorakit.injection import lora_configs
from tests.conftest import assert_unchanged, model_state
from tests.test_io import TOY_IDS, toy_with_adapter

FUZZ = settings(max_examples=int(os.environ.get("LORAKIT_FUZZ_EXAMPLES", 40)), deadline=5000, database=None,
                derandomize="LORAKIT_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10, 10**12) | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=6)


@cache
def valid_files() -> tuple[bytes, bytes]:
    with tempfile.TemporaryDirectory() as d:
        save_adapter(toy_with_adapter(), Path(d) / "a")
        return (Path(d) / "a" / "adapter_config.json").read_bytes(), \
            (Path(d) / "a" / "adapter_model.safetensors").read_bytes()


@contextmanager
def alarm(seconds: int):
    def hang(*_):
        raise TimeoutError(f"load_adapter ran over {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def attempt(config: bytes, weights: bytes) -> bool:
    """Load the files into a fresh Toy beside an existing adapter; True if it loaded, False if refused."""
    model = toy_with_adapter(name="existing", seed=5)
    snap = model_state(model)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "adapter_config.json").write_bytes(config)
        (Path(d) / "adapter_model.safetensors").write_bytes(weights)
        try:
            with alarm(5):
                name = load_adapter(model, d, "new")
        except AdapterFileError:
            assert_unchanged(snap, model)
            return False
    assert name == "new" and set(lora_configs(model)) == {"existing", "new"}
    for p in model.parameters():
        assert torch.isfinite(p).all()
    with torch.no_grad():
        assert torch.isfinite(model(TOY_IDS)).all()
    return True


def _split(weights: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(weights[:8], "little")
    return json.loads(weights[8:8 + n]), weights[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def test_the_unmutated_file_loads():
    assert attempt(*valid_files())


@FUZZ
@given(st.data())
def test_truncated_files(data):
    config, weights = valid_files()
    which = data.draw(st.sampled_from(["config", "weights"]))
    blob = config if which == "config" else weights
    cut = blob[:data.draw(st.integers(0, len(blob) - 1))]
    if which == "config":
        attempt(cut, weights)  # cutting only the final newline leaves a valid config
    else:
        assert not attempt(config, cut)


@FUZZ
@given(st.data())
def test_byte_flips(data):
    config, weights = valid_files()
    which = data.draw(st.sampled_from(["config", "weights", "weights"]))
    blob = bytearray(config if which == "config" else weights)
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] ^= data.draw(st.integers(1, 255))
    attempt(bytes(blob), weights) if which == "config" else attempt(config, bytes(blob))


@FUZZ
@given(st.data())
def test_header_edits(data):
    config, weights = valid_files()
    header, body = _split(weights)
    key = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    edit = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "delete", "rename", "value"]))
    if edit == "dtype":
        header[key]["dtype"] = data.draw(st.sampled_from(["F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "?"]))
    elif edit in ("shape", "data_offsets"):
        header[key][edit] = data.draw(st.lists(st.integers(-3, 2**41), max_size=4) | JSON)
    elif edit == "delete":
        del header[key]
    elif edit == "rename":
        header[data.draw(st.text(max_size=40))] = header.pop(key)
    else:
        header[key] = data.draw(JSON)
    attempt(config, _join(header, body))


@FUZZ
@given(st.data())
def test_shape_and_value_edits(data):
    config, weights = valid_files()
    tensors = safetensors.torch.load(weights)
    key = data.draw(st.sampled_from(sorted(tensors)))
    shape = data.draw(st.lists(st.integers(0, 10), max_size=4))
    fill = data.draw(st.sampled_from([0.0, 1.0, float("nan"), float("inf"), 1e30]))
    tensors[key] = torch.full(shape, fill) if data.draw(st.booleans()) else tensors[key].clone().fill_(fill)
    attempt(config, safetensors.torch.save(tensors))


@FUZZ
@given(st.data())
def test_config_edits(data):
    config, weights = valid_files()
    cfg = json.loads(config)
    fields = sorted(cfg) + ["use_dora", "unknown_field", "rank_pattern", "alpha_pattern"]
    for _ in range(data.draw(st.integers(1, 3))):
        field = data.draw(st.sampled_from(fields))
        if data.draw(st.booleans()):
            cfg[field] = data.draw(JSON)
        else:
            cfg.pop(field, None)
    attempt(json.dumps(cfg).encode(), weights)
