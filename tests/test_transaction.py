"""Every verb is all or nothing: a failure at any step (check, build, swap in) leaves the model exactly as it was."""

import pytest
import torch
from torch import nn

import lorakit.adapters
import lorakit.combination
import lorakit.injection
import lorakit.io
from lorakit import (
    LoraConfig,
    LoraConfigError,
    LoraStateError,
    combine,
    delete_adapter,
    inject,
    load_adapter,
    merge,
    save_adapter,
    set_adapter,
)
from lorakit.layers import LoraModule
from lorakit.saved import SavedModule
from tests.conftest import assert_unchanged, model_state, randomize_adapters


class Net(nn.Module):
    """Embedding -> Conv1d -> two Linears -> head: every layer type, built in microseconds."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.lin1 = nn.Linear(8, 8)
        self.lin2 = nn.Linear(8, 8)
        self.conv2 = nn.Conv1d(8, 8, 1, groups=groups)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.conv2(self.conv(self.emb(ids).transpose(1, 2))).transpose(1, 2)
        return self.head(self.lin2(torch.tanh(self.lin1(h))))


LOAD_CONFIG = LoraConfig(r=2, targets=["emb", "conv2", "lin1"], modules_to_save=["head"], bias="all")
A_CONFIG = LoraConfig(r=2, targets=["emb", "conv", "lin1"], modules_to_save=["head"], bias="all")
B_CONFIG = LoraConfig(r=2, targets=["lin1", "lin2"], modules_to_save=["head"], rank_pattern={"lin1": 1})


def _net(merged: bool = False, train: bool = True) -> Net:
    model = Net().train(train)
    inject(model, A_CONFIG, "a")
    inject(model, B_CONFIG, "b")
    for name, seed in (("a", 1), ("b", 2)):
        randomize_adapters(model, name, seed=seed)
    set_adapter(model, ["a", "b"])
    if merged:
        model.eval()
        merge(model)
    return model


def _fail_on_call(monkeypatch, owner, attr: str, n: int) -> None:
    """Make owner.attr raise RuntimeError on its n-th call (earlier calls run normally)."""
    original, calls = getattr(owner, attr), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attr, wrapper)


def test_failing_checks_change_nothing():
    model = _net()
    before = model_state(model)
    with pytest.raises(LoraConfigError, match=r"adapter name 'a/b'"):
        inject(model, LoraConfig(targets=["lin2"]), "a/b")
    fresh = Net()
    fresh_before = model_state(fresh)
    with pytest.raises(LoraConfigError, match="do not split into 3 equal slices"):  # lin2 comes after lin1
        inject(fresh, LoraConfig(targets=["lin1", "lin2"], slices={"lin2": [True, False, True]}), "c")
    assert_unchanged(fresh_before, fresh)
    # rank_pattern gives lin1 rank 2 in a and 1 in b: linear needs equal ranks in every layer
    with pytest.raises(LoraConfigError, match=r"at lin1 the adapters \['a', 'b'\] have ranks \[2, 1\]"):
        combine(model, ["a", "b"], [1.0, 1.0], "ab", method="linear")
    assert_unchanged(before, model)
    merged = _net(merged=True)
    before = model_state(merged)
    with pytest.raises(LoraStateError, match="merged into emb"):
        delete_adapter(merged, "a")
    with pytest.raises(LoraStateError, match="unmerge"):
        inject(merged, LoraConfig(targets=["lin2"]), "c")
    assert_unchanged(before, merged)


def test_grouped_conv_midway_leaves_the_model_as_it_was():
    model = Net(groups=2)
    before = model_state(model)
    with pytest.raises(LoraConfigError, match="groups=1"):
        inject(model, LoraConfig(targets=["emb", "conv", "lin1", "conv2"]))
    assert_unchanged(before, model)


STEPS = {  # verb -> [(where a step lives, its name, which call fails)]
    "inject": [(lorakit.injection, "select", 1), (LoraModule, "new_factors", 2), (SavedModule, "new_copy", 1),
               (lorakit.injection, "_set_submodule", 1), (LoraModule, "install", 2), (SavedModule, "install", 1),
               (lorakit.injection, "activate", 1)],
    "combine": [(lorakit.combination, "_combined_factors", 2), (LoraModule, "install", 3), (SavedModule, "install", 1),
                (lorakit.combination, "refresh_trainable", 1)],
    "delete": [(LoraModule, "delete_adapter", 2), (SavedModule, "delete_adapter", 1),
               (lorakit.adapters, "refresh_trainable", 1)],
    "load": [(lorakit.io, "_fit", 2), (lorakit.injection, "_set_submodule", 1), (LoraModule, "install", 2),
             (SavedModule, "install", 1)],
    "set_adapter": [(lorakit.adapters, "unmerge", 1), (lorakit.adapters, "activate", 1)],
    "merge": [(LoraModule, "merge", 3)],
}


def _run(verb: str, model: nn.Module, tmp_path) -> None:
    if verb == "inject":
        inject(model, LoraConfig(r=3, targets=["lin1", "lin2", "conv2"], modules_to_save=["head"]), "c")
    elif verb == "combine":
        combine(model, ["a", "b"], [0.5, -1.0], "ab", method="cat")
    elif verb == "delete":
        delete_adapter(model, "b")
    elif verb == "load":
        load_adapter(model, tmp_path / "a2", "a2")
    elif verb == "set_adapter":
        set_adapter(model, "b")
    else:
        merge(model)


@pytest.mark.parametrize("verb, owner, attr, n", [(v, *s) for v, steps in STEPS.items() for s in steps],
                         ids=[f"{v}-{s[1]}" for v, steps in STEPS.items() for s in steps])
def test_an_injected_failure_at_any_step_leaves_the_model_as_it_was(verb, owner, attr, n, monkeypatch, tmp_path):
    if verb == "load":
        source = Net()
        inject(source, LOAD_CONFIG, "a")
        randomize_adapters(source, "a", seed=5)
        save_adapter(source, tmp_path / "a2", "a")
    model = _net(merged=verb in ("set_adapter", "merge") and attr != "merge")
    if verb == "merge":
        model.eval()
    before = model_state(model)
    _fail_on_call(monkeypatch, owner, attr, n)
    with pytest.raises(RuntimeError, match="injected failure"):
        _run(verb, model, tmp_path)
    assert_unchanged(before, model)
    monkeypatch.undo()
    _run(verb, model, tmp_path)  # and without the failure the verb works on the restored model
    assert model_state(model)["repr"] != before["repr"] or verb in ("set_adapter", "merge")


def test_load_failing_after_biases_were_written_puts_them_back(monkeypatch, tmp_path):
    source = Net()
    inject(source, A_CONFIG, "a")
    randomize_adapters(source, "a", seed=5)
    with torch.no_grad():
        source.lin2.bias.add_(1.0)
    save_adapter(source, tmp_path / "a2", "a")
    model = _net()
    before = model_state(model)
    original = lorakit.io._plan

    def plan_with_a_bad_last_bias(*args):
        plan = original(*args)
        assert len(plan.biases) > 2
        plan.biases.append((plan.biases[0][0], torch.zeros(99)))  # copy_ fails after the others were written
        return plan

    monkeypatch.setattr(lorakit.io, "_plan", plan_with_a_bad_last_bias)
    with pytest.raises(RuntimeError):
        load_adapter(model, tmp_path / "a2", "a2")
    assert_unchanged(before, model)
