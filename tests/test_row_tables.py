"""Slot tables for the per-row decode kernel: a decode step read from the tables equals each row run alone with
its adapter (set_adapter, the plain layer path), whatever the adapters' ranks and targets; the tables follow
adapters that leave, come back from a new file, grow in rank or outnumber the slots; a forward writes nothing."""

import pytest
import torch

import lorakit.layers
from lorakit import LoraConfig, adapter_rows, delete_adapter, inject, set_adapter
from lorakit.row_tables import RowTables
from tests.conftest import logits_alone, make_tiny, randomize_adapters

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32: the same products summed in another order
TOKENS = torch.tensor([[5], [17], [42], [8], [9], [71]])  # one token per row: a decode step's shape


def _model(specs):
    """A tiny Llama with adapters {name: (r, targets)}, random nonzero factors."""
    model = make_tiny("llama")
    for k, (name, (r, targets)) in enumerate(specs.items()):
        inject(model, LoraConfig(r=r, alpha=2 * r, targets=targets), name)
        randomize_adapters(model, name, seed=k, std=0.3)
    return model


SPECS = {"a": (4, ["q_proj", "v_proj"]), "b": (2, ["v_proj", "o_proj", "down_proj"]), "c.1": (6, ["q_proj"])}


def _mixed(model, names, tables, ids=TOKENS):
    known = list(dict.fromkeys(n for n in names if n is not None))
    with torch.no_grad(), adapter_rows(known, [known.index(n) if n else -1 for n in names], tables=tables):
        return model(input_ids=ids).logits


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = lorakit.layers.table_lora_delta
    monkeypatch.setattr(lorakit.layers, "table_lora_delta", lambda *a: calls.append(1) or real(*a))
    return calls


def test_decode_step_from_the_tables_equals_each_row_alone_and_writes_nothing(counted):
    model = _model(SPECS)
    names = ["b", None, "a", "c.1", "a", "b"]
    tables = RowTables(slots=4)
    assert tables.sync(model, names)
    before = {n: dict(vars(m)) for n, m in model.named_modules()}
    slots_before = {m: (T.clone(), U.clone()) for m, (T, U) in tables.tables.items()}
    mixed = _mixed(model, names, tables)
    assert counted, "the decode step did not read the tables"
    assert {n: dict(vars(m)) for n, m in model.named_modules()} == before
    assert all(torch.equal(T, slots_before[m][0]) and torch.equal(U, slots_before[m][1])
               for m, (T, U) in tables.tables.items())
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i:i + 1], logits_alone(model, name, TOKENS[i:i + 1]), **TOL)


def test_prompts_and_gradients_never_read_the_tables(counted):
    model = _model(SPECS)
    tables = RowTables(slots=4)
    tables.sync(model, ["a", "b"])
    prompt = torch.tensor([[5, 6, 7], [8, 9, 10]])
    mixed = _mixed(model, ["a", "b"], tables, prompt)  # 3 tokens per row: the other kernels
    assert not counted
    for i, name in enumerate(["a", "b"]):
        torch.testing.assert_close(mixed[i:i + 1], logits_alone(model, name, prompt[i:i + 1]), **TOL)
    set_adapter(model, "a")  # trainable
    with adapter_rows(["a"], [0, 0], tables=tables):
        model(input_ids=TOKENS[:2]).logits.sum().backward()  # grad enabled: the layers' own path
    assert not counted
    assert model.get_submodule("model.layers.0.self_attn.v_proj").A("a").grad.abs().sum() > 0  # (q: 1 token)


def test_a_reloaded_adapter_is_read_from_its_new_file_after_drop():
    model = _model(SPECS)
    tables = RowTables(slots=4)
    tables.sync(model, ["a", "b"])
    delete_adapter(model, "a")
    inject(model, LoraConfig(r=3, targets=["q_proj", "down_proj"]), "a")  # same name, other rank and targets
    randomize_adapters(model, "a", seed=99, std=0.3)
    tables.drop("a")  # what the engine does on unload and install
    names = ["a", "b", None]
    assert tables.sync(model, names)
    mixed = _mixed(model, names, tables, TOKENS[:3])
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i:i + 1], logits_alone(model, name, TOKENS[i:i + 1]), **TOL)


def test_slots_are_reused_ranks_grow_and_too_many_adapters_fall_back(counted):
    model = _model({"r1": (1, ["q_proj", "v_proj"]), "r5": (5, ["q_proj", "v_proj"]), "r2": (2, ["v_proj"])})
    tables = RowTables(slots=2)
    for names in (["r1", None], ["r1", "r5"], ["r2", "r5"], ["r2", "r1"]):  # r5 widens the tables; evictions
        assert tables.sync(model, names)
        assert len(tables.slot) <= 2
        mixed = _mixed(model, names, tables, TOKENS[:2])
        for i, name in enumerate(names):
            torch.testing.assert_close(mixed[i:i + 1], logits_alone(model, name, TOKENS[i:i + 1]), **TOL)
    counted.clear()
    names = ["r1", "r5", "r2"]
    assert not tables.sync(model, names)  # three adapters, two slots: no tables for this step
    mixed = _mixed(model, names, None, TOKENS[:3])
    assert not counted
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i:i + 1], logits_alone(model, name, TOKENS[i:i + 1]), **TOL)


def test_a_name_without_a_slot_is_never_served_from_the_tables(counted):
    model = _model(SPECS)
    tables = RowTables(slots=4)
    tables.sync(model, ["a"])
    mixed = _mixed(model, ["a", "b"], tables, TOKENS[:2])  # "b" was not synced: the tables are not used at all
    assert not counted
    for i, name in enumerate(["a", "b"]):
        torch.testing.assert_close(mixed[i:i + 1], logits_alone(model, name, TOKENS[i:i + 1]), **TOL)


def test_one_adapter_on_every_row_takes_the_plain_matmuls(counted):
    model = _model(SPECS)
    tables = RowTables(slots=4)
    tables.sync(model, ["a"])
    mixed = _mixed(model, ["a"] * 3, tables, TOKENS[:3])
    assert not counted
    torch.testing.assert_close(mixed, logits_alone(model, "a", TOKENS[:3]), **TOL)
