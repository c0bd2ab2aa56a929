"""The experiment runner in quick mode on a tiny BERT (a CI smoke test: no accuracy is asserted): runs are
recorded and skipped on a second call, tables and figures are written, the equal-budget runs of `targets` do
train equally many values, every configuration of the long experiments is valid before anything runs, and
parity's full and lora runs are glue-mini's (so they are reused) and its gap to full fine-tuning is in points."""

import json
from dataclasses import fields

import pytest

from experiments import EXPERIMENTS
from experiments.runner import build_config, read_results, run_experiment
from lorakit.cli import main
from lorakit.errors import LoraConfigError
from lorakit.train.config import TrainConfig
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
                                        ("ner", 6), ("subspace", 4), ("parity", 37)])
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
    cpus = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    assert row["cpu"] == cpus[0]  # train times compare only within one CPU; sessions may land on other VMs


def test_reports_name_the_cpus_their_runs_trained_on():
    from experiments.runner import machines_text

    assert machines_text([{"cpu": "A"}, {"cpu": "A"}]).strip() == "Trained on: A (2 runs)."
    mixed = machines_text([{"cpu": "A"}, {}, {"cpu": "B"}])
    assert "A (1 run); unrecorded (1 run); B (1 run)" in mixed and "compare only within one CPU" in mixed


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


def _table_rows(markdown: str) -> list[list[str]]:
    """The cells of the first markdown table's body rows."""
    lines = markdown.split("\n\n## ")[0].splitlines()
    return [line.strip("| ").split(" | ") for line in lines if line.startswith("| ")][1:]


PARITY_LABELS = ["full", "lora", "lora-long", "lora-plus", "lora-r16", "lora-bias", "lora-ln", "lora-drop",
                 "lora-ln-drop", "lora-emb", "lora-ln-drop-r16", "lora-ln-drop-5ep", "full-5ep"]


def test_parity_quick_writes_a_row_per_recipe_and_its_figure(tiny_bert_dir, tmp_path):
    out = tmp_path / "parity"
    written = run_experiment(EXPERIMENTS["parity"], out, quick=True, model=tiny_bert_dir, log=lambda *_: None)
    assert [p.name for p in written] == ["parity.md", "parity.png"]
    assert (out / "parity.png").read_bytes()[:4] == b"\x89PNG"
    rows = read_results(out)
    assert [r["group"] for r in rows] == PARITY_LABELS
    assert all(r["quick"] and r["seed"] == 0 and r["summary"]["steps"] == 2 for r in rows)
    assert rows[3]["config"]["lora_plus_ratio"] == 8.0 and rows[4]["config"]["r"] == 16
    text = (out / "parity.md").read_text()
    table = _table_rows(text)
    assert [row[0] for row in table] == PARITY_LABELS
    assert table[0][2:4] == ["+0.00", "reference"] and table[0][6] == "1.00×"
    assert all(row[3] in ("yes", "no") and row[8] == "1" for row in table[1:])
    assert text.startswith("> **--quick smoke run**")
    assert "| lora-plus | lora | 0.0005 | 8 | 8 | 16 | 3 | 16 | – |" in text
    assert "| lora-ln-drop | lora | 0.001 | 1 | 8 | 16 | 3 | 16 | extra_trainable=*LayerNorm, dropout=0.1, " \
           "warmup_ratio=0.1 |" in text


def _result(label: str, seed: int, accuracy: float, step_s: float) -> dict:
    summary = {"metric_name": "accuracy", "metric": accuracy, "trainable": 10, "total": 100, "step_time_s": step_s,
               "steps": 100, "memory_mib": 1000.0}
    return {"name": f"sst2-{label}-s{seed}", "group": label, "seed": seed, "meta": {"label": label},
            "config": TrainConfig(method="full" if label == "full" else "lora").to_dict(), "summary": summary,
            "in_process": False}


def test_parity_report_measures_the_gap_to_full_fine_tuning_in_points(tmp_path):
    results = [_result("full", 0, 0.880, 3.0), _result("full", 1, 0.890, 3.0),   # mean 0.885, 300 s
               _result("lora", 0, 0.880, 1.5), _result("lora", 1, 0.884, 1.5),   # 0.3 points below: within
               _result("lora-r16", 0, 0.870, 6.0), _result("lora-r16", 1, 0.880, 6.0)]  # 1.0 below, 2x the time
    EXPERIMENTS["parity"].report(results, tmp_path, False)
    table = {row[0]: row for row in _table_rows((tmp_path / "parity.md").read_text())}
    assert table["full"][1:7] == ["0.8850 ± 0.0071", "+0.00", "reference", "10 (10%)", "300 s", "1.00×"]
    assert table["lora"][2:4] == ["-0.30", "yes"] and table["lora"][5:7] == ["150 s", "0.50×"]
    assert table["lora-r16"][2:4] == ["-1.00", "no"] and table["lora-r16"][6] == "2.00×"
    assert table["full"][7] == "1000 MiB" and table["full"][8] == "2"


def test_parity_full_and_lora_runs_are_glue_minis_so_the_runner_reuses_them(tmp_path):
    def configs(name: str) -> dict:
        specs = EXPERIMENTS[name].specs(False, None, tmp_path / name)
        return {s.name: build_config(s, tmp_path, False, None) for s in specs}

    parity, glue = configs("parity"), configs("glue-mini")
    shared = [n for n in parity if n.startswith(("sst2-full-s", "sst2-lora-s"))]
    assert len(shared) == 6 and all(parity[n] == glue[n] for n in shared)


def test_parity_candidates_are_trainconfig_fields_and_differ_from_the_default(monkeypatch):
    from experiments import parity
    from experiments.recipes import recipe

    known = {f.name for f in fields(TrainConfig)}
    default = TrainConfig(**{"task": "sst2", **recipe("lora")})
    for label, overlay in parity.CANDIDATES.items():
        assert set(overlay) <= known, label
        assert TrainConfig(**parity.candidate(label)) != default, label  # else the runner would reuse lora's runs
    monkeypatch.setitem(parity.CANDIDATES, "lora-typo", {"lora_plus_ration": 8.0})
    with pytest.raises(LoraConfigError, match="lora_plus_ration"):
        parity.specs(False, None, None)


def test_experiment_help_names_every_experiment(capsys):
    with pytest.raises(SystemExit):
        main(["experiment", "--help"])
    squashed = "".join(capsys.readouterr().out.split())  # argparse wraps the help, also at hyphens
    assert all(name in squashed for name in EXPERIMENTS)


def test_report_only_writes_an_interim_report_from_the_finished_runs_and_trains_nothing(tiny_bert_dir, tmp_path):
    from experiments.runner import Experiment, Spec, method_table, write_text

    def report(results, out, quick):
        return [write_text(out / "t.md", method_table(results), quick)]

    one = [Spec("head", "head", {"method": "head"})]
    two = one + [Spec("bitfit", "bitfit", {"method": "bitfit"})]
    run_experiment(Experiment("t", "", lambda q, s, o: one, report), tmp_path, quick=True, model=tiny_bert_dir,
                   log=lambda *_: None)
    (path,) = run_experiment(Experiment("t", "", lambda q, s, o: two, report), tmp_path, quick=True,
                             model=tiny_bert_dir, log=lambda *_: None, report_only=True)
    assert [r["name"] for r in read_results(tmp_path)] == ["head"]  # bitfit was not trained
    text = path.read_text()
    assert text.startswith("> **Interim report**: 1 of 2 runs finished") and "| head |" in text
    with pytest.raises(LoraConfigError, match="no finished runs"):
        run_experiment(Experiment("t", "", lambda q, s, o: two, report), tmp_path / "empty", quick=True,
                       model=tiny_bert_dir, log=lambda *_: None, report_only=True)


def test_the_readmes_parity_command_trains_the_measured_recipe():
    """README gives lora-ln-drop-5ep (the recipe within 0.3 points of full fine-tuning) as flags; they must build the
    configuration the parity experiment measured."""
    import re
    from pathlib import Path

    from experiments.parity import candidate
    from lorakit.cli import build_parser
    from lorakit.train.flags import config_from_args, given_fields

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    command = re.search(r"^\s+lorakit train --task sst2 (--extra_trainable .*)$", readme, re.M)
    argv = ["--task", "sst2", *[a.strip("'") for a in command.group(1).split()]]
    config = config_from_args(build_parser().parse_args(["train", *argv]), given_fields(argv))
    assert config == TrainConfig.from_dict(candidate("lora-ln-drop-5ep"))
