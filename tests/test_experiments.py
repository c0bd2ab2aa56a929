"""The experiment runner in quick mode on a tiny BERT (a CI smoke test: no accuracy is asserted): runs are
recorded and skipped on a second call, tables and figures are written, the equal-budget runs of `targets` do
train equally many values, and every configuration of the long experiments is valid before anything runs."""

import json

import pytest

from experiments import EXPERIMENTS
from experiments.runner import build_config, read_results, run_experiment
from lorakit.cli import main
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
                                        ("ner", 6), ("subspace", 4)])
def test_every_full_configuration_is_valid(tmp_path, name, count):
    specs = EXPERIMENTS[name].specs(False, None, tmp_path / name)
    assert len(specs) == count and len({s.name for s in specs}) == count
    configs = [build_config(s, tmp_path, False, None) for s in specs]
    assert all(c.max_steps == 0 and c.train_limit == 0 for c in configs)  # the real runs: whole splits, all epochs


def test_runs_shared_by_two_experiments_train_once(tiny_bert_dir, tmp_path):
    run_experiment(EXPERIMENTS["rank"], tmp_path / "rank", quick=True, model=tiny_bert_dir, log=lambda *_: None)
    assert (tmp_path / "rank" / "rank.png").read_bytes()[:4] == b"\x89PNG"
    logs = []
    written = run_experiment(EXPERIMENTS["subspace"], tmp_path / "subspace", quick=True, model=tiny_bert_dir,
                             log=logs.append)
    assert sum("reused" in line for line in logs) == 2  # r=8 and r=64 at seed 0 are rank's runs
    assert sorted(p.name for p in (tmp_path / "subspace" / "runs").iterdir()) == ["sst2-qv-r64-s1", "sst2-qv-r8-s1"]
    rows = {(r["meta"]["r"], r["seed"]): r for r in read_results(tmp_path / "subspace")}
    assert rows[(8, 0)]["reused"] == str(tmp_path / "rank" / "runs" / "sst2-qv-r8-s0")
    assert rows[(8, 0)]["summary"] == read_results(tmp_path / "rank")[3]["summary"]
    assert len(written) == 7  # its report reads the reused adapters where they are


def test_glue_mini_uses_the_lr_sweep_choice(tmp_path):
    (tmp_path / "lr-sweep").mkdir()
    (tmp_path / "lr-sweep" / "best_lr.json").write_text(json.dumps({"prefix": 0.123}))
    specs = EXPERIMENTS["glue-mini"].specs(False, 1, tmp_path / "glue-mini")
    assert {s.config["lr"] for s in specs if s.meta["label"] == "prefix"} == {0.123}


def test_an_unknown_experiment_is_named(capsys):
    assert main(["experiment", "glue-maxi", "--quick"]) == 2
    assert "expected one of lr-sweep, glue-mini" in capsys.readouterr().err


def test_a_run_in_its_own_process_records_its_own_peak_memory(tiny_bert_dir, tmp_path):
    from experiments.runner import Experiment, Spec, method_table

    exp = Experiment("one", "one run", lambda quick, seeds, out: [Spec("head", "head", {"method": "head"})],
                     lambda results, out, quick: [])
    run_experiment(exp, tmp_path, quick=True, model=tiny_bert_dir, in_process=False, log=lambda *_: None)
    (row,) = read_results(tmp_path)
    assert not row["in_process"] and row["summary"]["memory_kind"] == "peak RSS" and row["summary"]["steps"] == 2
    assert "(runner)" not in method_table([row])


def test_lr_sweep_report_picks_the_best_lr_per_method_and_draws_its_curves(tmp_path):
    rows = [{"meta": {"label": label}, "config": {"lr": lr}, "summary": {"metric": acc}}
            for label, lr, acc in (("prefix", 1e-3, 0.80), ("prefix", 3e-3, 0.85), ("prefix", 1e-2, 0.70),
                                   ("prompt", 1e-2, 0.60), ("prompt", 3e-2, 0.65))]
    written = EXPERIMENTS["lr-sweep"].report(rows, tmp_path, False)
    assert json.loads((tmp_path / "best_lr.json").read_text()) == {"prefix": 3e-3, "prompt": 3e-2}
    assert tmp_path / "lr_sweep.png" in written and (tmp_path / "lr_sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "| prefix | 0.003 | 0.8500 |" in (tmp_path / "lr_sweep.md").read_text()


def test_error_bars_are_seed_std_or_the_binomial_standard_error():
    from statistics import stdev

    from experiments.plots import error_bar

    assert error_bar([0.85, 0.86, 0.88]) == stdev([0.85, 0.86, 0.88])
    assert abs(error_bar([0.85], 872) - 0.012092) < 1e-6  # sqrt(0.85 * 0.15 / 872)
    assert error_bar([0.85]) == 0.0 and error_bar([2.5], 100) == 0.0  # no sample size; not a proportion
