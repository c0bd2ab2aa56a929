"""The experiment runner in quick mode on a tiny BERT (a CI smoke test: no accuracy is asserted): runs are
recorded and skipped on a second call, tables and figures are written, the equal-budget runs of `targets` do
train equally many values, and every configuration of the long experiments is valid before anything runs."""

import json

import pytest

from experiments import EXPERIMENTS
from experiments.runner import build_config, read_results, run_experiment
from lorakit.cli import main
from lorakit.errors import LoraConfigError
from tests.train.conftest import save_tiny_bert


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> str:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def test_subspace_quick_writes_its_figures_and_resumes(tiny_bert_dir, tmp_path):
    out = tmp_path / "subspace"
    written = run_experiment(EXPERIMENTS["subspace"], out, quick=True, model=tiny_bert_dir, log=lambda *_: None)
    assert sorted(p.name for p in written) == sorted(
        ["phi_r8_r64_query.png", "phi_r8_r64_value.png", "phi_seeds_r64_query.png", "phi_seeds_r64_value.png",
         "spectra_r8.png", "spectra_r64.png", "subspace.md"])
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written if p.suffix == ".png")
    rows = read_results(out)
    assert [(r["meta"]["r"], r["seed"]) for r in rows] == [(8, 0), (64, 0), (8, 1), (64, 1)]
    assert all(r["quick"] and r["summary"]["steps"] == 2 for r in rows)
    text = (out / "subspace.md").read_text()
    assert text.startswith("> **--quick smoke run**") and "amplification" in text
    logs = []
    run_experiment(EXPERIMENTS["subspace"], out, quick=True, model=tiny_bert_dir, log=logs.append)
    assert len(read_results(out)) == 4 and "4 already done" in logs[0]  # nothing trained again


def test_targets_quick_through_the_cli_keeps_the_budget_equal(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "targets"
    assert main(["experiment", "targets", "--quick", "--model", tiny_bert_dir, "--out", str(out)]) == 0
    rows = read_results(out)
    assert [r["meta"]["set"] for r in rows] == ["q", "k", "v", "o", "qk", "qv", "qkvo"]
    assert len({r["summary"]["trainable"] for r in rows}) == 1  # r = 8, 4, 2 for 1, 2, 4 matrix types
    assert "| {Wq, Wv} | 4 |" in (out / "targets.md").read_text()


@pytest.mark.parametrize("name,count", [("glue-mini", 60), ("lr-sweep", 15), ("rank", 5), ("targets", 7),
                                        ("ner", 6), ("subspace", 4), ("rank-e2e", 3), ("e2e-methods", 5)])
def test_every_full_configuration_is_valid(tmp_path, name, count):
    specs = EXPERIMENTS[name].specs(False, None, tmp_path / name)
    assert len(specs) == count and len({s.name for s in specs}) == count
    model = str(tmp_path) if "e2e" in name else None  # SmolLM2 is resolved by name only when no --model is given
    configs = [build_config(s, tmp_path, False, model) for s in specs]
    assert all(c.max_steps == 0 and c.train_limit == 0 for c in configs)  # the real runs: whole splits, all epochs


def test_glue_mini_uses_the_lr_sweep_choice(tmp_path):
    (tmp_path / "lr-sweep").mkdir()
    (tmp_path / "lr-sweep" / "best_lr.json").write_text(json.dumps({"prefix": 0.123}))
    specs = EXPERIMENTS["glue-mini"].specs(False, 1, tmp_path / "glue-mini")
    assert {s.config["lr"] for s in specs if s.meta["label"] == "prefix"} == {0.123}


def test_an_unknown_experiment_is_named(capsys):
    assert main(["experiment", "glue-maxi", "--quick"]) == 2
    assert "expected one of lr-sweep, glue-mini" in capsys.readouterr().err


def test_a_named_model_without_lorakit_models_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lorakit.models", None)  # as in a lorakit without the LLM issue's module
    spec = EXPERIMENTS["rank-e2e"].specs(False, None, tmp_path)[0]
    with pytest.raises(LoraConfigError, match="pass --model DIR"):
        build_config(spec, tmp_path, False, None)


def test_e2e_methods_quick_on_a_tiny_gpt2_trains_the_closed_form_counts(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.train.conftest import bpe_tokenizer

    tok, d, layers, p = bpe_tokenizer(), 32, 2, 10
    config = GPT2Config(n_layer=layers, n_embd=d, n_head=2, vocab_size=len(tok), n_positions=128,
                        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    run_experiment(EXPERIMENTS["e2e-methods"], tmp_path / "out", quick=True, model=str(tmp_path / "m"),
                   log=lambda *_: None)
    counts = {r["meta"]["label"]: r["summary"]["trainable"] for r in read_results(tmp_path / "out")}
    m = d // 32  # the default bottleneck
    assert counts == {"lora": layers * 2 * 4 * (d + d),  # q and v slices of c_attn, r = 4: A (4, d) + B (d, 4)
                      "adapter": layers * 2 * (2 * d * m + d + m), "adapter-l": layers * (2 * d * m + d + m + 2 * d),
                      "prefix": layers * 2 * p * d, "prompt": p * d}


def test_a_run_in_its_own_process_records_its_own_peak_memory(tiny_bert_dir, tmp_path):
    from experiments.runner import Experiment, Spec, method_table

    exp = Experiment("one", "one run", lambda quick, seeds, out: [Spec("head", "head", {"method": "head"})],
                     lambda results, out, quick: [])
    run_experiment(exp, tmp_path, quick=True, model=tiny_bert_dir, in_process=False, log=lambda *_: None)
    (row,) = read_results(tmp_path)
    assert not row["in_process"] and row["summary"]["memory_kind"] == "peak RSS" and row["summary"]["steps"] == 2
    assert "(runner)" not in method_table([row])
