"""Bad adapter files: each raises AdapterFileError naming the file, the key and the problem; the model is unchanged."""

import json

import pytest
import safetensors.torch
import torch

import lorakit.adapter_file
from lorakit import AdapterFileError, LoraConfig, inject, load_adapter, save_adapter
from tests.conftest import assert_unchanged, make_tiny, model_state
from tests.test_io import Toy, toy_with_adapter

UNSUPPORTED = ": this PEFT option is not supported by lorakit yet; only adapters without it can be loaded"


@pytest.mark.parametrize("field, value, message", [
    ("use_dora", True, "field 'use_dora': True" + UNSUPPORTED),
    ("layer_replication", [[0, 1]], "field 'layer_replication': [[0, 1]]" + UNSUPPORTED),
    ("init_lora_weights", "pissa", "field 'init_lora_weights': 'pissa' is not true or 'gaussian'"),
    ("lora_bias", True, "field 'lora_bias': True" + UNSUPPORTED),
    ("loftq_config", {"loftq_bits": 4}, "field 'loftq_config': {'loftq_bits': 4}" + UNSUPPORTED),
    ("layers_to_transform", [0], "field 'layers_to_transform': [0]" + UNSUPPORTED),
    ("peft_type", "IA3", "field 'peft_type': 'IA3' is not supported; lorakit reads peft_type 'LORA' only"),
    ("some_future_option", 3, "field 'some_future_option': 3: unknown PEFT field with a non-default value"),
    ("r", "4", "field 'r': '4' is not an integer >= 1"),
    ("rank_pattern", {"lin": "2"}, "field 'rank_pattern': {'lin': '2'} is not an object {module pattern: integer"),
    ("modules_to_save", "head", "field 'modules_to_save': 'head' is not null or a list of names"),
    ("target_modules", "(a+)+b", "field 'target_modules': regex repeats a group, e.g. (...)+"),
    ("target_modules", None, "field 'target_modules': null; expected the list of adapted module names"),
    ("lora_alpha", -1, "field 'lora_alpha': -1: expected a number > 0"),
    ("lora_dropout", 1.5, "field 'lora_dropout': 1.5: expected a number in [0, 1)"),
])
def test_unsupported_or_bad_config_fields_are_refused_by_name(tmp_path, field, value, message):
    save_adapter(toy_with_adapter(), tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg[field] = value
    path.write_text(json.dumps(cfg))
    model = Toy()
    snap = model_state(model)
    with pytest.raises(AdapterFileError) as e:
        load_adapter(model, tmp_path / "a")
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)
    assert_unchanged(snap, model)


def test_unknown_fields_at_their_default_are_tolerated(tmp_path):
    save_adapter(toy_with_adapter(), tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "some_future_option": None, "use_dora": False}))
    load_adapter(Toy(), tmp_path / "a")


# -- bad weight files -----------------------------------------------------------------------------------------
def _edit_tensors(path, edit):
    f = path / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(f)
    edit(tensors)
    safetensors.torch.save_file(tensors, f)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("base_model.model.lin.lora_B.weight"), "lin.lora_B.weight: missing"),
    (lambda t: [t.pop(k) for k in list(t) if k.startswith("base_model.model.lin.")], "missing lora_A/lora_B"),
    (lambda t: t.pop("base_model.model.head.bias"), "head.bias: missing"),
    (lambda t: t.update({"base_model.model.extra.lora_A.weight": torch.zeros(2, 8),
                         "base_model.model.extra.lora_B.weight": torch.zeros(8, 2)}), "unexpected lora_A/lora_B"),
    (lambda t: t.update({"base_model.model.lin.bias": torch.zeros(6)}), "lin.bias: unexpected key"),
    (lambda t: t.update({"base_model.model.lin.lora_magnitude_vector": torch.ones(6)}), "DoRA"),
    (lambda t: t.update({"lin.lora_A.weight": torch.zeros(4, 8)}), "every key starts with"),
    (lambda t: t.update({"base_model.model.lin.lora_A.weight": torch.zeros(4, 9)}), "needs A (4, 8)"),
    (lambda t: t.update({"base_model.model.lin.lora_A.weight": torch.zeros(3, 8)}), "do not pair up"),
    (lambda t: t.update({"base_model.model.lin.lora_A.weight": torch.zeros(3, 8),
                         "base_model.model.lin.lora_B.weight": torch.zeros(6, 3)}), "do not fit rank 4"),
    (lambda t: t.update({"base_model.model." + "x." * 200 + "lora_A.weight": torch.zeros(3, 8)}), "at most 300"),
    (lambda t: t.update({"base_model.model.head.weight": torch.zeros(3, 7)}), "the model's is (3, 6)"),
    (lambda t: t["base_model.model.conv.lora_A.weight"].view(-1)[3].fill_(float("nan")), "NaN or Inf"),
    (lambda t: t["base_model.model.head.weight"].view(-1)[0].fill_(float("inf")), "NaN or Inf"),
    (lambda t: t.update({"base_model.model.lin.lora_A.weight": torch.zeros(4, 8, dtype=torch.int32)}),
     "floating point"),
    (lambda t: t.update({"base_model.model.lin.lora_embedding_A": torch.zeros(4, 8)}), "mixes embedding"),
])
def test_bad_weights_raise_naming_file_and_key_and_leave_model_unchanged(tmp_path, edit, message):
    save_adapter(toy_with_adapter(), tmp_path / "a")
    _edit_tensors(tmp_path / "a", edit)
    model = toy_with_adapter(name="existing", seed=3)  # loading beside an adapter must not disturb it either
    snap = model_state(model)
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors") as e:
        load_adapter(model, tmp_path / "a", "new")
    assert message in str(e.value)
    assert_unchanged(snap, model)


def _raw(header, data):
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


@pytest.mark.parametrize("raw, message", [
    (b"", "8-byte header"),
    ((10**9).to_bytes(8, "little") + b"{}", "exceeds the file"),
    ((5).to_bytes(8, "little") + b"{oops", "not valid JSON"),
    ((2).to_bytes(8, "little") + b"[]", "JSON object"),
    (_raw({"x": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, b"\x00"), "not allowed"),
    (_raw({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\x00" * 4), "expected 8"),
    (_raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\x00" * 8), "overlap or leave a gap"),
    (_raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 9), "trailing bytes"),
    (_raw({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\x00" * 4), "not a list of sizes"),
    (_raw({"x": {"dtype": "F32", "shape": [1]}}, b"\x00" * 4), "expected {dtype, shape, data_offsets}"),
    (_raw({"__metadata__": {"a": 1}}, b""), "__metadata__"),
])
def test_malformed_safetensors_headers(tmp_path, raw, message):
    save_adapter(toy_with_adapter(), tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(raw)
    with pytest.raises(AdapterFileError, match=message):
        load_adapter(Toy(), tmp_path / "a")


def test_pickle_files_are_refused_with_a_conversion_hint(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    (tmp_path / "a" / "adapter_model.bin").write_bytes(b"\x80\x04 not even looked at")
    with pytest.raises(AdapterFileError, match=r"adapter_model.bin.*refused.*offline.*save_file"):
        load_adapter(Toy(), tmp_path / "a")
    with pytest.raises(AdapterFileError, match="not a directory"):
        load_adapter(Toy(), tmp_path / "nowhere")


def test_wrong_base_model_is_refused(tmp_path):
    save_adapter(toy_with_adapter(), tmp_path / "a")
    model = make_tiny("llama")
    snap = model_state(model)
    with pytest.raises(AdapterFileError, match="target_modules"):
        load_adapter(model, tmp_path / "a")
    assert_unchanged(snap, model)


def test_weights_over_the_size_cap_are_refused_before_reading(tmp_path, monkeypatch):
    save_adapter(toy_with_adapter(), tmp_path / "a")
    size = (tmp_path / "a" / "adapter_model.safetensors").stat().st_size
    read = []
    monkeypatch.setattr(lorakit.adapter_file, "parse_safetensors", lambda *a: read.append(1))
    model = Toy()
    snap = model_state(model)
    with pytest.raises(AdapterFileError, match=rf"adapter_model.safetensors: {size:,} bytes, over the 1,000-byte cap"):
        load_adapter(model, tmp_path / "a", max_bytes=1000)
    assert not read
    assert_unchanged(snap, model)


def test_finite_in_the_file_but_inf_in_an_fp16_model_is_refused(tmp_path):
    model = Toy()
    inject(model, LoraConfig(r=2, targets=["lin"]))
    with torch.no_grad():
        model.lin.A("default").fill_(1e5)  # fine in the fp32 file and in fp32 adapters; inf as fp16
    save_adapter(model, tmp_path / "a")
    load_adapter(Toy(), tmp_path / "a")  # an fp32 model takes it
    half = Toy().half()
    snap = model_state(half)
    with pytest.raises(AdapterFileError, match=r"lin.lora_A.weight: values overflow to Inf in the model's "
                                               r"torch.float16 \(largest magnitude 1e\+05\)"):
        load_adapter(half, tmp_path / "a")
    assert_unchanged(snap, half)


def test_symlinks_leaving_the_adapter_directory_are_refused(tmp_path):
    save_adapter(toy_with_adapter(), tmp_path / "a")
    outside = tmp_path / "elsewhere.safetensors"
    (tmp_path / "a" / "adapter_model.safetensors").rename(outside)
    (tmp_path / "a" / "adapter_model.safetensors").symlink_to(outside)
    with pytest.raises(AdapterFileError, match="a symlink to .*elsewhere.safetensors, outside the adapter directory"):
        load_adapter(Toy(), tmp_path / "a")
    inside = tmp_path / "a" / "weights.bin"  # a link inside the directory is fine
    outside.rename(inside)
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    (tmp_path / "a" / "adapter_model.safetensors").symlink_to(inside)
    load_adapter(Toy(), tmp_path / "a")
