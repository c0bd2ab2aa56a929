"""StepPlans: a decode plan per adapter load version, held only around steps whose rows all use that adapter."""

from types import SimpleNamespace

import torch

from lorakit import LoraConfig, adapter_rows, inject
from lorakit.decode_plan import PlanEntry
from lorakit.serve.step_plans import StepPlans
from tests.conftest import logits_alone, make_tiny, randomize_adapters

IDS = torch.tensor([[5, 17, 42, 8], [3, 3, 71, 20]])


def test_plans_follow_the_load_version_and_only_serve_uniform_steps():
    model = make_tiny("llama")
    inject(model, LoraConfig(r=4, targets="all-linear"), "a")
    inject(model, LoraConfig(r=2, targets=["q_proj", "v_proj"]), "b")
    randomize_adapters(model, "a", seed=1)
    randomize_adapters(model, "b", seed=2)
    registry = SimpleNamespace(loaded={"a": 1, "b": 1})
    plans = StepPlans(model, registry)
    q = model.model.layers[0].self_attn.q_proj
    with plans.for_step(["a", "a"]) as n:
        assert n == 14 and isinstance(vars(q).get("forward"), PlanEntry)
        with torch.no_grad(), adapter_rows(["a"], [0, 0]):
            got = model(input_ids=IDS).logits
    assert "forward" not in vars(q)  # set only around the step
    torch.testing.assert_close(got, logits_alone(model, "a", IDS), rtol=1e-5, atol=1e-5)
    for names in (["a", "b"], ["a", None], [None, None]):  # mixed or base rows: no plan
        with plans.for_step(names):
            assert "forward" not in vars(q)
    first = plans.built["a"][1]
    randomize_adapters(model, "a", seed=3)  # "a" installed again from another file: a new version
    registry.loaded["a"] = 2
    with plans.for_step(["a"]), torch.no_grad(), adapter_rows(["a"], [0, 0]):
        again = model(input_ids=IDS).logits
    assert plans.built["a"][1] is not first
    torch.testing.assert_close(again, logits_alone(model, "a", IDS), rtol=1e-5, atol=1e-5)
    with plans.for_step(["b"]):
        pass
    del registry.loaded["a"]  # unloaded: its plan is dropped when the next one is built
    registry.loaded["b"] = 2
    with plans.for_step(["b"]):
        assert set(plans.built) == {"b"}
