"""The command line: train's flags are TrainConfig's fields; train → eval → predict → merge → inspect on tiny
runs (predict checked against the merged export loaded by plain transformers); errors are one line, exit 2."""

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from lorakit.cli import build_parser, main
from lorakit.train.config import TrainConfig
from lorakit.train.flags import config_from_args
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
    assert dests == {f.name for f in fields(TrainConfig)} | {"per_device_train_batch_size"}  # HF's, converted
    args = parser.parse_args(["train", "--task", "rte", "--targets", "query", "value", "--r", "4", "--alpha", "8",
                              "--max-steps", "5", "--lr", "1e-3", "--extra_trainable", "pooler", "--resume",
                              "--no-progress", "--lora_plus_ratio", "16"])
    assert config_from_args(args) == TrainConfig(task="rte", targets=["query", "value"], r=4, alpha=8.0, max_steps=5,
                                                 lr=1e-3, extra_trainable=["pooler"], resume=True, progress=False,
                                                 lora_plus_ratio=16.0)
    assert config_from_args(parser.parse_args(["train", "--targets", "all-linear"])).targets == "all-linear"
    assert config_from_args(parser.parse_args(["train", "--targets", ".*(query|key)"])).targets == ".*(query|key)"
    assert config_from_args(parser.parse_args(["train"])) == TrainConfig()


# The README's SST-2 table ("The recipe") and example command: each method's lr and global batch.
README_RECIPES = {"lora": ("lr 1e-3, **batch 16**", 1e-3, 16),
                  "full": ("full fine-tuning (lr 5e-5, batch 32)", 5e-5, 32),
                  "bitfit": ("bitfit (lr 1e-3, batch 32)", 1e-3, 32),
                  "head": ("head / linear probe (lr 1e-2, batch 32)", 1e-2, 32),
                  "top-k": ("--method top-k --top_k 2 --lr 5e-5 --batch_size 32", 5e-5, 32)}


@pytest.mark.parametrize("method", sorted(README_RECIPES))
def test_each_method_has_its_own_default_recipe_and_explicit_flags_win(method):
    parser = build_parser()
    text, lr, batch = README_RECIPES[method]
    assert text in (ROOT / "README.md").read_text()
    config = config_from_args(parser.parse_args(["train", "--method", method]))
    assert (config.lr, config.batch_size) == (lr, batch) == (TrainConfig(method=method).lr,
                                                             TrainConfig(method=method).batch_size)
    config = config_from_args(parser.parse_args(["train", "--method", method, "--lr", "2e-4"]))
    assert (config.lr, config.batch_size) == (2e-4, batch)
    config = config_from_args(parser.parse_args(["train", "--method", method, "--batch_size", "8"]))
    assert (config.lr, config.batch_size) == (lr, 8)


def test_a_run_prints_its_recipe_first(tmp_path, tiny_bert_dir, capsys):
    argv = ["train", "--model", tiny_bert_dir, "--method", "head", "--out", str(tmp_path / "run"), "--train_limit",
            "16", "--dev_limit", "8", "--max_steps", "2", "--threads", "1", "--no-progress"]
    assert main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == ("recipe (method head): lr 0.01, batch_size 32 (global), max_steps 2, warmup_ratio 0.06, schedule "
                     "linear, weight_decay 0, grad_accum 1, max_grad_norm 1, seed 0, precision fp32 (given: "
                     "max_steps; the rest are head's defaults)")
    assert TrainConfig.load(tmp_path / "run" / "config.json").lr == 1e-2


def test_hugging_face_training_argument_spellings(monkeypatch):
    from peft import LoraConfig as PeftLoraConfig
    from transformers import TrainingArguments

    from lorakit.train.flags import TRAIN_ALIASES

    real = {f.name for f in fields(TrainingArguments)} | {f.name for f in fields(PeftLoraConfig)} | {
        "model_name_or_path"}  # HF's example scripts' ModelArguments
    assert {a for names in TRAIN_ALIASES.values() for a in names} <= real
    assert {"per_device_train_batch_size", "lr_scheduler_type", "bf16", "use_cpu", "warmup_steps", "weight_decay",
            "max_grad_norm", "seed", "max_steps", "gradient_checkpointing"} <= real  # same names or converted
    argv = ["train", "--model_name_or_path", "m", "--output_dir", "o", "--learning_rate", "2e-4",
            "--num_train_epochs", "2.0", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "4",
            "--per_device_eval_batch_size", "16", "--warmup_steps", "0.1", "--weight_decay", "0.01",
            "--max_grad_norm", "0.5", "--seed", "3", "--lr_scheduler_type", "constant_with_warmup", "--bf16",
            "--use_cpu", "--eval_steps", "10", "--save_steps", "20", "--gradient_checkpointing", "--r", "4",
            "--lora_alpha", "8", "--lora_dropout", "0.05", "--target_modules", "query", "value"]
    expected = TrainConfig(model="m", out="o", lr=2e-4, epochs=2, batch_size=8, grad_accum=4, eval_batch_size=16,
                           warmup_ratio=0.1, weight_decay=0.01, max_grad_norm=0.5, seed=3, schedule="constant",
                           precision="bf16", device="cpu", eval_every=10, checkpoint_every=20,
                           gradient_checkpointing=True, r=4, alpha=8.0, dropout=0.05, targets=["query", "value"])
    assert config_from_args(build_parser().parse_args(argv)) == expected
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun: per-device 8 on 2 processes is a global batch of 16
    assert config_from_args(build_parser().parse_args(argv)).batch_size == 16


@pytest.mark.parametrize("argv, needle", [
    (["--per_device_train_batch_size", "8", "--batch_size", "16"], "--batch_size is the global batch"),
    (["--lr_scheduler_type", "constant"], "--schedule constant --warmup_ratio 0"),
    (["--num_train_epochs", "2.5"], "'2.5': expected a whole number"),
    (["--warmup_steps", "100"], "pass a value in [0, 1)"),
])
def test_hugging_face_spellings_refuse_what_does_not_map(argv, needle, capsys):
    try:
        code = main(["train", *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2 and needle in capsys.readouterr().err


def test_train_eval_predict_merge_inspect(tmp_path, tiny_bert_dir, capsys):
    run = tmp_path / "run"
    assert main(_train_args(tiny_bert_dir, run)) == 0
    out = capsys.readouterr().out
    assert "trainable (% of total)" in out and "peak RSS" in out and "accuracy" in out
    assert main(["eval", "--adapter", str(run / "adapter"), "--dev_limit", "16"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics == pytest.approx(json.loads((run / "summary.json").read_text())["dev"], abs=1e-6)

    texts = ["a warm , funny film .", "tedious and far too long ."]
    assert main(["predict", "--adapter", str(run / "adapter"), "--device", "cpu", *texts]) == 0
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
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"loss", "precision", "recall", "f1"}
    conll = ROOT / "lorakit" / "data" / "wnut17" / "emerging.dev.conll"
    assert main(["eval", "--adapter", str(tmp_path / "ner" / "adapter"), "--dev_limit", "8", "--data", str(conll)]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(metrics, abs=1e-6)


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


def test_eval_takes_a_data_file_or_directory_and_says_which(tmp_path, tiny_bert_dir, capsys):
    assert main(_train_args(tiny_bert_dir, tmp_path / "run")) == 0  # trained with the first 16 dev sentences
    capsys.readouterr()
    adapter = str(tmp_path / "run" / "adapter")
    expected = json.loads((tmp_path / "run" / "summary.json").read_text())["dev"]
    sst2 = ROOT / "lorakit" / "data" / "sst2"
    assert main(["eval", "--adapter", adapter, "--data", str(sst2 / "stsa.binary.dev"), "--dev_limit", "16"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == pytest.approx(expected, abs=1e-6)
    assert captured.err == f"lorakit eval: sst2, the whole file {sst2 / 'stsa.binary.dev'} (16 of 872 examples)\n"
    assert main(["eval", "--adapter", adapter, "--data", str(sst2), "--dev_limit", "16", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == pytest.approx(expected, abs=1e-6)
    assert captured.err == f"lorakit eval: sst2, the dev split {sst2 / 'stsa.binary.dev'} (16 of 872 examples)\n"
    # The same 16 sentences as a GLUE tsv with another name: the format comes from the suffix.
    lines = (sst2 / "stsa.binary.dev").read_text().splitlines()[:16]
    (tmp_path / "test.tsv").write_text("label\tsentence\n" + "".join(f"{ln[0]}\t{ln[2:]}\n" for ln in lines))
    assert main(["eval", "--adapter", adapter, "--data", str(tmp_path / "test.tsv")]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == pytest.approx(expected, abs=1e-6) and "(16 of 16 examples)" in captured.err
    (tmp_path / "pairs.tsv").write_text("sentence1\tsentence2\tlabel\na\tb\t0\n")
    assert main(["eval", "--adapter", adapter, "--data", str(tmp_path / "pairs.tsv")]) == 2
    assert "use task 'pair-classification'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_eval_and_predict_refuse_a_device_this_machine_lacks(tmp_path, command, capsys):
    extra = ["a fine film ."] if command == "predict" else []
    missing = "cuda:7" if torch.cuda.is_available() else "cuda"
    assert main([command, "--adapter", str(tmp_path), "--device", missing, *extra]) == 2
    err = capsys.readouterr().err
    assert f"--device {missing}: " in err and "use --device c" in err and len(err.splitlines()) == 1
    assert main([command, "--adapter", str(tmp_path), "--device", "gpu", *extra]) == 2
    assert "--device 'gpu': not a device; expected cpu, cuda, cuda:N or auto" in capsys.readouterr().err


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
    assert sum(("positive (" in line or "negative (" in line) for line in out.splitlines()) == 6
    # the last step serves the adapter over HTTP: the served labels and probabilities equal the in-process ones
    lines = out.splitlines()
    local = [ln.split()[:2] for ln in lines if ln.startswith("  ") and ("positive (" in ln or "negative (" in ln)
             and "served:" not in ln]
    served = [ln.split()[1:3] for ln in lines if ln.startswith("  served: ")]
    assert len(local) == len(served) == 3 and local == served
    assert "lorakit serve --model minilm --adapters" in out
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").is_file()
