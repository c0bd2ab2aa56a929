"""`lorakit train | eval | predict | generate | merge | inspect | experiment | demo`.

`train`'s flags are TrainConfig's fields, one to one (`--max_steps 100` or `--max-steps 100`), with the
field's docstring line as help, plus the Hugging Face TrainingArguments / PEFT spellings that mean the same
thing (train/flags.py). Errors lorakit raises on bad input print as one line and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lorakit.errors import LoraError
from lorakit.train.config import TrainConfig
from lorakit.train.flags import add_train_flags, config_from_args, given_fields
from lorakit.train.readers import DataError

DEMO_SENTENCES = ["a gripping , beautifully acted film that stays with you .",
                  "a dull , lifeless mess that never finds its footing .",
                  "the plot is thin , but the performances make it worth seeing ."]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning: small, exact, PEFT-compatible.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_flags(sub.add_parser("train", help="train an adapter (or a baseline method) on a task"))
    ev = sub.add_parser("eval", help="evaluate a trained adapter on a dev split")
    ev.add_argument("--adapter", required=True, help="RUN/adapter of a finished `lorakit train` run")
    ev.add_argument("--data", default=None, help="a data file (all of it is scored; format as for training) or a data "
                                                 "directory (its dev split); default: the run's data")
    ev.add_argument("--task", default=None, help="task name (default: the run's task)")
    ev.add_argument("--model", default=None, help="base model directory or name (minilm) (default: the run's base)")
    ev.add_argument("--dev_limit", "--dev-limit", type=int, default=0, help="first N dev examples; 0 = all")
    ev.add_argument("--batch_size", "--batch-size", type=int, default=None,
                    help="examples per forward (default 64; E2E generation: 16)")
    ev.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    _add_e2e_eval_flags(ev)
    _add_generate_parser(sub)
    pr = sub.add_parser("predict", help="predict raw texts with a trained adapter")
    pr.add_argument("--adapter", required=True, help="RUN/adapter of a finished `lorakit train` run")
    pr.add_argument("--model", default=None, help="base model directory or name (minilm) (default: the run's base)")
    pr.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    pr.add_argument("texts", nargs="+", help="texts; sentence pairs as 'first || second'; NER: words by spaces")
    mg = sub.add_parser("merge", help="export base + LoRA adapter merged, as a plain transformers model")
    mg.add_argument("--adapter", required=True, help="a PEFT-layout adapter directory")
    mg.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    mg.add_argument("--base", "--model", dest="model", default=None,
                    help="base model directory or name (minilm) (default: the adapter's base_model_name_or_path)")
    mg.add_argument("--task", default=None, help="causal-lm, seq-cls, token-cls, ... (default: adapter's task_type)")
    ins = sub.add_parser("inspect", help="summarise an adapter directory: config, ranks, |dW| per module")
    ins.add_argument("adapter", help="a PEFT-layout adapter directory")
    ins.add_argument("--plot", default=None, help="also draw the singular values of every module's dW to this PNG")
    ex = sub.add_parser("experiment", help="run one of the paper-in-miniature experiments (experiments/)")
    ex.add_argument("name", help="lr-sweep, glue-mini, rank, targets, ner, subspace, parity, rank-e2e, "
                                 "e2e-methods")
    ex.add_argument("--quick", action="store_true", help="a tiny slice and 2 steps per run: a smoke test")
    ex.add_argument("--out", default=None, help="output directory (default: runs/experiments/NAME)")
    ex.add_argument("--model", default=None, help="base model directory instead of the experiment's (MiniLM, SmolLM2)")
    ex.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default: the experiment's)")
    ex.add_argument("--report", action="store_true",
                    help="train nothing: write the tables and figures from the runs already finished (interim)")
    from lorakit.serve.flags import add_serve_flags

    add_serve_flags(sub.add_parser("serve", help="OpenAI-compatible server: one base, many adapters per request"))
    dm = sub.add_parser("demo", help="train SST-2 LoRA on the bundled MiniLM with the defaults, then classify")
    dm.add_argument("--out", default="runs/demo")
    dm.add_argument("--max_steps", "--max-steps", type=int, default=0, help="a smaller budget; 0 = the full recipe")
    dm.add_argument("--dev_limit", "--dev-limit", type=int, default=0, help="first N dev sentences; 0 = all 872")
    return parser


def _cmd_train(args: argparse.Namespace) -> None:
    from lorakit.train.loop import train

    train(config_from_args(args, given_fields(args.argv[args.argv.index("train") + 1:])))


def _add_e2e_eval_flags(ev: argparse.ArgumentParser) -> None:
    ev.description = ("--data FILE (an E2E MR||reference file such as lorakit/data/e2e/test.txt) with a causal-LM "
                      "run: generate one text per MR and print BLEU, NIST, METEOR, ROUGE-L, CIDEr.")
    ev.add_argument("--limit", type=int, default=0, help="E2E: first N MRs only (a quick check); 0 = all")
    ev.add_argument("--num_beams", "--num-beams", type=int, default=1, help="E2E: 1 = greedy (default)")
    ev.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=96,
                    help="E2E: per output (the longest test reference is 89 SmolLM2 tokens)")
    ev.add_argument("--out", default=None, help="E2E: where outputs.txt and scores.json go "
                    "(default: RUN/eval-<data file name>)")


def _cmd_eval(args: argparse.Namespace) -> None:
    from lorakit.train.inference import eval_data, evaluate_adapter, resolve_device

    resolve_device(args.device)  # an unavailable device fails before the data and model load
    if _is_e2e_file(args):
        return _cmd_eval_e2e(args)
    split = eval_data(args.adapter, args.data, args.task)
    n = min(len(split.dev), args.dev_limit or len(split.dev))
    what = "the whole file" if not split.train else "the dev split"  # a single file comes without a train split
    print(f"lorakit eval: {split.task}, {what} {split.dev_path} ({n} of {len(split.dev)} examples)", file=sys.stderr)
    metrics = evaluate_adapter(args.adapter, model_dir=args.model, dev_limit=args.dev_limit,
                               batch_size=args.batch_size or 64, device=args.device, split=split)
    print(json.dumps(metrics))


def _is_e2e_file(args: argparse.Namespace) -> bool:
    """`--data FILE` in E2E format (MR||reference lines, not .jsonl) for a causal-LM run: generation + E2E metrics
    (a .jsonl file, or a directory, is scored by loss as for any task)."""
    from pathlib import Path

    from lorakit.train.inference import run_info

    if args.data is None or not Path(args.data).is_file() or Path(args.data).suffix == ".jsonl":
        return False
    return run_info(args.adapter)["kind"] == "causal_lm"


def _cmd_eval_e2e(args: argparse.Namespace) -> None:
    from pathlib import Path

    from lorakit.adapters import merge
    from lorakit.e2e import evaluate_e2e, report
    from lorakit.train.inference import load_trained

    model, tokenizer, _ = load_trained(args.adapter, args.model, args.device)
    merge(model)  # LoRA folded into the weights: the same outputs at the base model's decoding speed
    out = args.out or Path(args.adapter).parent / f"eval-{Path(args.data).stem}"
    result = evaluate_e2e(model, tokenizer, args.data, limit=args.limit, batch_size=args.batch_size or 16,
                          num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, out_dir=out)
    print(report(result))


SST2_NAMES = {"0": "negative", "1": "positive"}


def _format_prediction(pred: dict, names: dict[str, str] | None = None) -> str:
    if "label" in pred:
        return f"{(names or {}).get(pred['label'], pred['label'])} ({pred['prob']:.3f})"
    if "tags" in pred:
        return " ".join(word if tag == "O" else f"{word}/{tag}" for word, tag in pred["tags"])
    return pred["completion"]


def _cmd_predict(args: argparse.Namespace) -> None:
    from lorakit.train.inference import predict_texts

    for text, pred in zip(args.texts, predict_texts(args.adapter, args.texts, args.model, args.device), strict=True):
        print(f"{_format_prediction(pred)}\t{text}")


def _cmd_merge(args: argparse.Namespace) -> None:
    from lorakit.adapter_file import read_adapter
    from lorakit.export import export_merged
    from lorakit.train.tasks import resolve_model_path

    base = args.model or read_adapter(args.adapter).config.base_model_name_or_path
    if not base:
        raise DataError(f"{args.adapter}: the adapter names no base model; pass --base DIR")
    print(export_merged(resolve_model_path(base), args.adapter, args.out, args.task))


def _cmd_inspect(args: argparse.Namespace) -> None:
    from lorakit.export import inspect_adapter

    print(inspect_adapter(args.adapter))
    if args.plot:
        from lorakit.analysis import adapter_factors, adapter_spectra, plot_spectra

        print(f"spectra of dW: {plot_spectra(adapter_spectra(adapter_factors(args.adapter)), args.plot)}")


def _cmd_experiment(args: argparse.Namespace) -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "experiments" / "__init__.py").is_file():
        raise DataError(f"lorakit experiment needs a source checkout (experiments/ beside lorakit/, not in {root})")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from experiments import EXPERIMENTS
    from experiments.runner import run_experiment

    if args.name not in EXPERIMENTS:
        raise DataError(f"experiment {args.name!r}: expected one of {', '.join(EXPERIMENTS)}")
    out = args.out or str(Path("runs") / "experiments" / (args.name + ("-quick" if args.quick else "")))
    run_experiment(EXPERIMENTS[args.name], out, quick=args.quick, model=args.model, seeds=args.seeds,
                   report_only=args.report)


def _cmd_demo(args: argparse.Namespace) -> None:
    import time

    from lorakit.train.loop import train
    from lorakit.train.tasks import predict

    config = TrainConfig(out=args.out, max_steps=args.max_steps, dev_limit=args.dev_limit)
    budget = (f"{config.epochs} epochs of batch {config.batch_size} (the default recipe)"
              if not config.max_steps else f"{config.max_steps} steps of batch {config.batch_size}, a smaller budget "
              f"than the default recipe's {config.epochs} epochs")
    print(f"lorakit demo: LoRA ({config.targets}, r={config.r}, alpha={config.alpha:g}, lr={config.lr:g}) on the "
          "bundled all-MiniLM-L6-v2, "
          f"SST-2 (6,920 train / 872 dev sentences); {budget}.", flush=True)
    start = time.perf_counter()
    result = train(config)
    print(f"dev accuracy {result.dev['accuracy']:.4f} ({args.dev_limit or 872} sentences); "
          f"wall time {time.perf_counter() - start:.0f} s")
    preds = predict(result.model, result.tokenizer, "classification", ["0", "1"], DEMO_SENTENCES, config.max_length)
    for text, pred in zip(DEMO_SENTENCES, preds, strict=True):
        print(f"  {_format_prediction(pred, SST2_NAMES):<18} {text}")
    print(f"try: lorakit predict --adapter {result.adapter_dir} \"an utterly charming film .\"")
    from lorakit.serve.demo import classify_over_http

    run_dir = Path(result.adapter_dir).parent
    print(f"serving {run_dir.name} with lorakit serve on 127.0.0.1; POST /v1/classify:", flush=True)
    answers, command = classify_over_http(run_dir, DEMO_SENTENCES)
    for text, answer in zip(DEMO_SENTENCES, answers, strict=True):
        served = {"label": answer["label"], "prob": max(answer["probs"])}
        print(f"  served: {_format_prediction(served, SST2_NAMES)}   {text}")
    print(f"serve it yourself: {command}")
    print(f"  curl -s localhost:8000/v1/classify -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{run_dir.name}\", \"input\": [\"a dull mess .\"]}}'")


def _cmd_serve(args: argparse.Namespace) -> None:
    from lorakit.serve.flags import config_from_flags
    from lorakit.serve.server import run

    run(config_from_flags(args))


def _add_generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="generate text with a causal LM: bare, with an adapter, or merged")
    gen.add_argument("prompts", nargs="+", help="one or more prompts (batched together)")
    gen.add_argument("--model", default=None, help="model directory or bundled name (default: the adapter's base, "
                     "else smollm2)")
    gen.add_argument("--adapter", default=None, help="RUN/adapter of a `lorakit train` run, or a PEFT adapter dir")
    gen.add_argument("--merge", action="store_true", help="merge the LoRA adapter into the weights first")
    gen.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=128)
    gen.add_argument("--num_beams", "--num-beams", type=int, default=1, help="1 = greedy or sampling")
    gen.add_argument("--do_sample", "--do-sample", action="store_true", help="sample instead of greedy")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top_p", "--top-p", type=float, default=1.0)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable); trimmed from the output")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                     help="apply the chat template (default: if the tokenizer has one and the run is not plain LM)")
    gen.add_argument("--batch_size", "--batch-size", type=int, default=8)
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--weights", choices=["dense", "int8", "int4"], default="dense",
                     help="int8 / int4: quantized base weights, LoRA unmerged (faster on CPU, see benchmarks)")
    gen.add_argument("--compile", action="store_true",
                     help="torch.compile the decode step with a static KV cache (60-90 s to compile; needs gcc)")


def _cmd_generate(args: argparse.Namespace) -> None:
    from lorakit.generate import compile_for_decoding, generate, load_for_generation
    from lorakit.train.data import LM_SEPARATOR

    model, tokenizer, plain = load_for_generation(args.model, args.adapter, args.merge, args.weights)
    if args.compile:
        compile_for_decoding(model)
    prompts = [p + LM_SEPARATOR for p in args.prompts] if plain else args.prompts
    chat = False if plain and args.chat is None else args.chat
    texts = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                     temperature=args.temperature, top_p=args.top_p, num_beams=args.num_beams, stop=args.stop,
                     chat=chat, batch_size=args.batch_size, seed=args.seed, static_cache=args.compile)
    for i, text in enumerate(texts):
        print(("" if len(texts) == 1 else f"[{i}] ") + text.strip())


COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "generate": _cmd_generate, "predict": _cmd_predict,
            "merge": _cmd_merge, "inspect": _cmd_inspect, "experiment": _cmd_experiment, "serve": _cmd_serve,
            "demo": _cmd_demo}


def main(argv: list[str] | None = None) -> int:
    """Run one command; lorakit's own errors (bad config, data, adapter files) print one line, exit 2."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # which train flags were given (recipes)
    try:
        COMMANDS[args.command](args)
    except (LoraError, DataError) as e:
        first, *items = [line.strip() for line in str(e).splitlines() if line.strip()]
        message = " ".join([first, "; ".join(item.removeprefix("- ") for item in items)]).strip()
        print(f"lorakit {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
