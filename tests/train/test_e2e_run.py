"""Task e2e end to end on a tiny GPT-2: the dev split is grouped by MR; `lorakit train --task e2e` applies
the e2e recipe only to flags not given; `lorakit eval --data test.txt` writes one output per MR, in file
order, equal to `generate` on the reloaded (unmerged) run, scored as e2e_metrics scores them;
`lorakit generate --adapter` continues the run's plain prompt format."""

import json

import pytest

from lorakit import e2e_metrics
from lorakit.cli import build_parser, main
from lorakit.e2e_metrics import bleu, group_by_mr, nist
from lorakit.generate import generate
from lorakit.train.config import METHOD_RECIPES, RECIPES, TrainConfig
from lorakit.train.data import E2E_DEV_FRACTION, bundled_data_dir, load_task, read_e2e, split_by_mr
from lorakit.train.flags import config_from_args, given_fields
from lorakit.train.inference import load_trained
from lorakit.train.loop import train

TEST = bundled_data_dir("e2e") / "test.txt"


def test_dev_split_is_grouped_by_mr():
    rows = read_e2e(bundled_data_dir("e2e") / "valid.txt")
    train_part, dev = split_by_mr(rows, E2E_DEV_FRACTION)
    train_mrs, dev_mrs = {ex.prompt for ex in train_part}, {ex.prompt for ex in dev}
    assert not train_mrs & dev_mrs and len(train_mrs | dev_mrs) == 547 and len(dev_mrs) == round(0.1 * 547)
    assert sorted(train_part + dev, key=lambda ex: ex.line) == rows  # every row once, file order kept
    task = load_task("e2e")
    assert (task.train, task.dev) == (train_part, dev)  # the same split on every call
    assert split_by_mr(rows, 0.1, seed="other")[1] != dev


def _train_config(argv):
    args = build_parser().parse_args(argv)
    return config_from_args(args, given_fields(argv[1:]))


def test_e2e_recipe_fills_only_flags_not_given():
    config = _train_config(["train", "--task", "e2e"])
    recipe = RECIPES["e2e"]
    assert config == TrainConfig(**{**recipe, "task": "e2e"}) and config.model == "smollm2"
    mine = _train_config(["train", "--task", "e2e", "--r", "8", "--alpha=4", "--targets", "q_proj", "v_proj"])
    assert (mine.r, mine.alpha, mine.targets, mine.lr, mine.epochs) == (8, 4.0, ["q_proj", "v_proj"], 1e-3, 1)
    full = _train_config(["train", "--task", "e2e", "--method", "full"])  # the method keeps its own lr
    assert (full.lr, full.batch_size, full.model) == (METHOD_RECIPES["full"]["lr"], 8, "smollm2")
    hf = _train_config(["train", "--task", "e2e", "--per_device_train_batch_size", "4"])
    assert hf.batch_size == 4
    assert _train_config(["train", "--task", "sst2"]) == TrainConfig(task="sst2")


@pytest.fixture(scope="module")
def e2e_run(tiny_gpt2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e-run") / "run"
    train(TrainConfig(model=tiny_gpt2_dir, task="e2e", out=str(out), train_limit=16, dev_limit=8, batch_size=8,
                      max_steps=3, lr=1e-2, max_length=128, threads=1, progress=False))
    return out


def test_eval_writes_one_output_per_mr_and_scores_them(e2e_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(e2e_metrics.shutil, "which", lambda name: None)  # no JVM here (test_e2e_metrics has it)
    out = tmp_path / "eval"
    assert main(["eval", "--adapter", str(e2e_run / "adapter"), "--data", str(TEST), "--limit", "5",
                 "--max_new_tokens", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    outputs = (out / "outputs.txt").read_text().splitlines()
    groups = group_by_mr(TEST)[:5]
    model, tokenizer, _ = load_trained(e2e_run / "adapter")
    expected = generate(model, tokenizer, [mr + " ||" for mr, _ in groups], max_new_tokens=8, chat=False)
    assert outputs == [" ".join(t.split()) for t in expected]
    scores = json.loads((out / "scores.json").read_text())["scores"]
    refs = [r for _, r in groups]
    assert scores["BLEU"] == bleu(outputs, refs) and scores["NIST"] == nist(outputs, refs)
    assert scores["METEOR"] is None and "METEOR not computed" in printed and "java not found" in printed
    assert (out / "references.txt").read_text().split("\n\n")[1].splitlines() == groups[1][1]


def test_generate_cli_continues_the_runs_plain_format(e2e_run, capsys):
    assert main(["generate", "--adapter", str(e2e_run / "adapter"), "name : Zizzi | eatType : pub",
                 "--max_new_tokens", "6"]) == 0
    model, tokenizer, _ = load_trained(e2e_run / "adapter")
    (expected,) = generate(model, tokenizer, ["name : Zizzi | eatType : pub ||"], max_new_tokens=6, chat=False)
    assert capsys.readouterr().out.strip() == expected.strip()


def test_generate_cli_merged_and_bare_peft_directory(e2e_run, tiny_gpt2_dir, tmp_path, capsys):
    import shutil

    model, tokenizer, _ = load_trained(e2e_run / "adapter")
    (expected,) = generate(model, tokenizer, ["name : Zizzi ||"], max_new_tokens=6, chat=False)
    assert main(["generate", "--adapter", str(e2e_run / "adapter"), "--merge", "name : Zizzi",
                 "--max_new_tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()
    bare = shutil.copytree(e2e_run / "adapter", tmp_path / "peft-adapter")  # no task.json beside it: a PEFT dir
    assert main(["generate", "--model", tiny_gpt2_dir, "--adapter", str(bare), "--no-chat", "name : Zizzi ||",
                 "--max_new_tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()


@pytest.mark.parametrize("method", ["adapter", "adapter-l", "prefix", "prompt"])
def test_eval_rebuilds_adapter_and_prefix_runs_as_trained(method, tiny_llama_dir, tmp_path, monkeypatch):
    # these methods save trainable.safetensors, not a LoRA file: eval must rebuild their modules and hooks (the
    # prefix on grouped-query attention) and generate, batched with left padding, what the trained model does
    monkeypatch.setattr(e2e_metrics.shutil, "which", lambda name: None)
    result = train(TrainConfig(model=tiny_llama_dir, task="e2e", method=method, out=str(tmp_path / "run"),
                               train_limit=16, dev_limit=8, batch_size=8, max_steps=3, lr=5e-2, max_length=128,
                               threads=1, progress=False))
    assert (tmp_path / "run" / "adapter" / "trainable.safetensors").is_file()
    assert main(["eval", "--adapter", str(tmp_path / "run" / "adapter"), "--data", str(TEST), "--limit", "5",
                 "--max_new_tokens", "8", "--out", str(tmp_path / "eval")]) == 0
    prompts = [mr + " ||" for mr, _ in group_by_mr(TEST)[:5]]
    expected = generate(result.model, result.tokenizer, prompts, max_new_tokens=8, chat=False)
    assert (tmp_path / "eval" / "outputs.txt").read_text().splitlines() == [" ".join(t.split()) for t in expected]
