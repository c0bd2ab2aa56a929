"""The E2E table's rows (experiments/e2e_table.py) and the two experiments that are views over them, on a tiny
Llama in quick mode (a smoke test: no score is asserted, only that every row trained the closed-form number of
values and came back with well-formed scores), and every row's flags as the real runs parse them."""

import pytest

from experiments import EXPERIMENTS, e2e_table
from experiments.e2e import METHOD_ROWS, RANK_ROWS
from experiments.runner import run_experiment
from lorakit import e2e_metrics
from lorakit.cli import build_parser, config_from_args, given_fields, main
from lorakit.errors import LoraConfigError
from lorakit.train.bottleneck import ADAPTER_LR
from lorakit.train.prefix import PREFIX_LR, PROMPT_LR
from tests.train.conftest import save_tiny_llama

D, LAYERS, KV = 32, 2, 16  # the tiny Llama: hidden size, blocks, key/value width (2 of 4 heads of 8)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def test_the_views_run_each_table_row_once_with_closed_form_counts(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(e2e_metrics.shutil, "which", lambda name: None)  # no JVM: METEOR, ROUGE-L, CIDEr say so
    out, logs = tmp_path / "e2e", []
    run_experiment(EXPERIMENTS["e2e-methods"], out, quick=True, model=tiny_llama_dir, log=logs.append)
    assert [line for line in logs if line.startswith("==")] == [f"== {e2e_table.ALL_ROWS[n][0]}" for n in METHOD_ROWS]
    assert main(["experiment", "rank-e2e", "--quick", "--model", tiny_llama_dir, "--out", str(out)]) == 0
    trained = [line for line in capsys.readouterr().out.splitlines() if line.startswith("==")]
    assert trained == ["== LoRA q,v r=1", "== LoRA q,v r=16"]  # r=4 is e2e-methods' row, not trained again
    rows = e2e_table.read_rows(out / "results.json")
    assert sorted(rows) == sorted(set(METHOD_ROWS) | set(RANK_ROWS))
    lora = {r: LAYERS * r * ((D + D) + (D + KV)) for r in (1, 4, 16)}  # q: A (r, d) + B (d, r); v: B (kv, r)
    assert {name: row["trainable"] for name, row in rows.items()} == {
        "lora-qv-r1": lora[1], "lora-qv-r4": lora[4], "lora-qv-r16": lora[16],
        "adapter": LAYERS * 2 * (2 * D * 60 + D + 60), "adapter-l": LAYERS * (2 * D * 3 + D + 3 + 2 * D),
        "prefix": LAYERS * 2 * 10 * KV, "prompt": 10 * D}
    for name, row in rows.items():
        s = row["scores"]
        assert row["steps"] == 2 and 0 <= s["BLEU"] <= 1 and s["NIST"] >= 0, name
        assert s["METEOR"] is s["ROUGE_L"] is s["CIDEr"] is None, name
        assert len((out / "runs" / name / "eval-test" / "outputs.txt").read_text().splitlines()) == 4, name
    methods, rank = (out / "e2e_methods.md").read_text(), (out / "rank_e2e.md").read_text()
    assert methods.startswith("> **--quick smoke run**")
    assert all(f"| {e2e_table.ALL_ROWS[n][0]} | {rows[n]['trainable']:,} |" in methods for n in METHOD_ROWS)
    assert all(f"| {e2e_table.ALL_ROWS[n][0]} |" in rank for n in RANK_ROWS) and "| n/c |" in rank
    assert (out / "rank_e2e.png").read_bytes()[:4] == b"\x89PNG"


def _config(flags: list[str]):
    argv = ["train", "--task", "e2e", *flags]
    return config_from_args(build_parser().parse_args(argv), given_fields(argv[1:]))


def test_every_table_row_is_a_valid_e2e_run_at_its_methods_lr():
    configs = {name: _config(flags) for name, (_, flags) in e2e_table.ALL_ROWS.items() if flags is not None}
    assert all(c.model == "smollm2" and c.epochs == 1 and c.batch_size == 8 and c.max_steps == 0
               and c.train_limit == 0 for c in configs.values())  # the e2e budget, whole splits
    got = {n: (c.method, c.lr, c.bottleneck, c.prefix_length) for n, c in configs.items()
           if n in ("adapter", "adapter-l", "prefix", "prompt")}
    assert got == {"adapter": ("adapter", ADAPTER_LR, 60, 10), "adapter-l": ("adapter-l", ADAPTER_LR, 3, 10),
                   "prefix": ("prefix", PREFIX_LR, 0, 10), "prompt": ("prompt", PROMPT_LR, 0, 10)}
    r4 = configs["lora-qv-r4"]
    for name, r in RANK_ROWS.items():  # the rank rows are the table's q,v r=4 row at another r
        assert configs[name].to_dict() == {**r4.to_dict(), "r": r}
    assert list(e2e_table.ROWS)[:6] == ["zero-shot", "lora-qv-r4", "lora-all-linear", "top-k", "bitfit", "full"]


def test_e2e_views_run_one_seed(tmp_path):
    with pytest.raises(LoraConfigError, match="one seed"):
        run_experiment(EXPERIMENTS["rank-e2e"], tmp_path, quick=True, seeds=3)
