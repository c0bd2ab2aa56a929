"""The command line: train's flags are TrainConfig's fields; train → eval → predict → merge → inspect on tiny
runs (predict checked against the merged export loaded by plain transformers); errors are one line, exit 2."""

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from lorakit.cli import build_parser, config_from_args, main
from lorakit.train.config import TrainConfig
from tests.train.conftest import save_tiny_bert

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> str:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def _train_args(model_dir, out, task="sst2", *extra):
    return ["train", "--model", model_dir, "--task", task, "--out", str(out), "--train_limit", "16", "--dev_limit",
            "16", "--batch_size", "8", "--max_steps", "4", "--lr", "1e-2", "--threads", "1", "--no-progress", *extra]


def test_train_flags_map_one_to_one_onto_trainconfig():
    parser = build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in train_parser._actions if a.dest != "help"}
    assert dests == {f.name for f in fields(TrainConfig)}
    args = parser.parse_args(["train", "--task", "rte", "--targets", "query", "value", "--r", "4", "--alpha", "8",
                              "--max-steps", "5", "--lr", "1e-3", "--extra_trainable", "pooler", "--resume",
                              "--no-progress", "--lora_plus_ratio", "16"])
    assert config_from_args(args) == TrainConfig(task="rte", targets=["query", "value"], r=4, alpha=8.0, max_steps=5,
                                                 lr=1e-3, extra_trainable=["pooler"], resume=True, progress=False,
                                                 lora_plus_ratio=16.0)
    assert config_from_args(parser.parse_args(["train", "--targets", "all-linear"])).targets == "all-linear"
    assert config_from_args(parser.parse_args(["train", "--targets", ".*(query|key)"])).targets == ".*(query|key)"
    assert config_from_args(parser.parse_args(["train"])) == TrainConfig()


def test_train_eval_predict_merge_inspect(tmp_path, tiny_bert_dir, capsys):
    run = tmp_path / "run"
    assert main(_train_args(tiny_bert_dir, run)) == 0
    out = capsys.readouterr().out
    assert "trainable (% of total)" in out and "peak RSS" in out and "accuracy" in out
    assert main(["eval", "--adapter", str(run / "adapter"), "--dev_limit", "16"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics == pytest.approx(json.loads((run / "summary.json").read_text())["dev"], abs=1e-6)

    texts = ["a warm , funny film .", "tedious and far too long ."]
    assert main(["predict", "--adapter", str(run / "adapter"), *texts]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[1] for line in lines] == texts
    assert main(["merge", "--base", str(tiny_bert_dir), "--adapter", str(run / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    for line, text in zip(lines, texts, strict=True):  # predict's label and probability, from the merged model
        with torch.no_grad():
            probs = merged(**tok(text, return_tensors="pt")).logits[0].softmax(-1)
        label, prob = line.split("\t")[0].split()
        assert label == str(int(probs.argmax())) and float(prob.strip("()")) == pytest.approx(float(probs.max()),
                                                                                               abs=1e-3)
    assert main(["inspect", str(run / "adapter")]) == 0
    shown = capsys.readouterr().out
    assert "target_modules" in shown and "modules_to_save ['classifier']" in shown


def test_pairs_and_tags_predict(tmp_path, tiny_bert_dir, capsys):
    assert main(_train_args(tiny_bert_dir, tmp_path / "rte", "rte")) == 0
    assert main(_train_args(tiny_bert_dir, tmp_path / "ner", "wnut17", "--method", "bitfit")) == 0
    capsys.readouterr()
    assert main(["predict", "--adapter", str(tmp_path / "rte" / "adapter"), "It rains. || The street is wet."]) == 0
    label = capsys.readouterr().out.split()[0]
    assert label in ("entailment", "not_entailment")
    assert main(["predict", "--adapter", str(tmp_path / "rte" / "adapter"), "no separator here"]) == 2
    assert "'first sentence || second sentence'" in capsys.readouterr().err
    assert main(["predict", "--adapter", str(tmp_path / "ner" / "adapter"), "Alice flew to Paris"]) == 0
    words = capsys.readouterr().out.split("\t")[0].split()
    assert [w.split("/")[0] for w in words] == ["Alice", "flew", "to", "Paris"]  # one tag per word
    assert sorted(p.name for p in (tmp_path / "ner" / "adapter").iterdir()) == ["trainable.safetensors"]
    assert main(["eval", "--adapter", str(tmp_path / "ner" / "adapter"), "--dev_limit", "8"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"loss", "precision", "recall", "f1"}


def test_eval_refuses_labels_outside_the_adapters_label_set(tmp_path, tiny_bert_dir, capsys):
    assert main(_train_args(tiny_bert_dir, tmp_path / "run")) == 0
    data = tmp_path / "three"
    data.mkdir()
    (data / "train.tsv").write_text("sentence\tlabel\na\t0\nb\t1\nc\t2\n")
    (data / "dev.tsv").write_text("sentence\tlabel\nd\t2\n")
    capsys.readouterr()
    assert main(["eval", "--adapter", str(tmp_path / "run" / "adapter"), "--data", str(data),
                 "--task", "classification"]) == 2
    err = capsys.readouterr().err
    assert "labels ['2']" in err and "not in the adapter's label set ['0', '1']" in err


@pytest.mark.parametrize("argv, needle", [
    (["train", "--r", "0", "--lr", "-1"], "TrainConfig: r=0: expected an integer >= 1; lr=-1.0: expected a number > 0"),
    (["train", "--data", "/nonexistent/dir"], "/nonexistent/dir for task 'sst2' does not exist"),
    (["eval", "--adapter", "/nonexistent/adapter"], "no such directory"),
    (["inspect", "/nonexistent/adapter"], "/nonexistent/adapter"),
])
def test_errors_are_one_line_and_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lorakit {argv[0]}: error: ") and needle in lines[0], lines
    assert "Traceback" not in captured.err


def test_the_real_process_exits_2_without_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "lorakit", "train", "--method", "lorax"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("lorakit train: error: invalid TrainConfig: method='lorax': expected one of "
                                   "lora, full, top-k, bitfit, head, adapter, adapter-l, prefix, prompt")


def test_demo_on_a_small_budget(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--max_steps", "2", "--dev_limit", "32"]) == 0
    out = capsys.readouterr().out
    assert "2 steps of batch 16, a smaller budget" in out and "dev accuracy" in out and "trainable (% of total)" in out
    assert sum(("positive (" in line or "negative (" in line) for line in out.splitlines()) == 3
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").is_file()
