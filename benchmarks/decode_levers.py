"""Batch-1 decoding levers on SmolLM2-135M-Instruct: what a static KV cache, torch.compile, int8/int4 weights buy.

Issue 10's single-stream target is >= 0.5x llama.cpp (99 tok/s measured here on the Q4_1 GGUF, 2 threads). At
batch 1 a decode step reads every weight once (540 MB in fp32, 135 MB in int8) and runs ~2,000 small eager ops
(HF's Llama forward plus the int8 layers' casts), so both the bytes and the per-op dispatch cost matter. This
measures each lever alone and together, for the bare base and for a LoRA adapter served unmerged (q, v, r=8 by
default, `--targets all-linear` for every linear layer; nonzero B, `lorakit.load_adapter`):

    cache     dynamic (transformers' default DynamicCache, what `lorakit generate` and the server use today)
              static  (cache_implementation="static": fixed shapes, the precondition for compiling the step)
    compile   eager, or torch.compile(model.forward) (inductor, C++ kernels; needs a C compiler, gcc here)
    weights   fp32, or int8 per-channel / int4 per-32-group weight-only (`lorakit.quant`, the server's --weights)

Every setting runs in a fresh process: load, (quantize), one warm-up generate (for compile: the compilation,
reported separately), then greedy `--new_tokens` tokens; tokens/s is the median of `--rounds` timed generates in
that process. Also reported: whether the greedy tokens equal the eager dynamic fp32 run's (compile must not
change the result; int8 may, within the agreement measured by benchmarks/dtype_agreement.py).

    python benchmarks/decode_levers.py                  # SmolLM2, 64 new tokens, 2 threads
    python benchmarks/decode_levers.py --quick          # tiny random Llama, a smoke test (numbers mean nothing)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from generate_speed import make_adapter  # noqa: E402  (LoRA r=8, random nonzero A and B)

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
WEIGHTS = ("fp32", "int8", "int4")
CACHES = (("dynamic", False), ("static", False), ("static", True))


def settings(weights: list[str], compile_rows: bool) -> list[tuple]:
    return [(a, c, comp, w) for a in ("base", "lora") for w in weights for c, comp in CACHES
            if compile_rows or not comp]


def make_tiny(out: str) -> str:
    """A tiny random Llama (the --quick model), saved with a tokenizer-free config; returns its directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def worker(args: argparse.Namespace) -> None:
    """One setting: print {"tokens_per_s", "warmup_s", "tokens"} as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    from lorakit.quant import quantize
    from lorakit.train.tasks import load_model

    model = load_model(args.model_dir, "causal_lm", []).eval()
    if args.adapter_kind == "lora":
        from lorakit import load_adapter

        load_adapter(model, args.adapter)
    quantize(model, "dense" if args.weights == "fp32" else args.weights)
    if args.compile:
        model.forward = torch.compile(model.forward, dynamic=False)
    vocab = model.config.vocab_size
    ids = torch.tensor([[(7 * i + 3) % vocab for i in range(24)]]) if args.tiny else None
    if ids is None:
        from lorakit.train.tasks import load_tokenizer

        tok = load_tokenizer(args.model_dir)
        ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    options = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None,
               "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens,
               "pad_token_id": model.config.eos_token_id if model.config.eos_token_id is not None else 0}
    if args.cache == "static":
        options["cache_implementation"] = "static"
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, **options)  # warm-up; with compile, the compilation
        warmup = time.perf_counter() - start
        runs, out = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = model.generate(ids, **options)
            runs.append(time.perf_counter() - start)
    runs.sort()
    print(json.dumps({"tokens_per_s": args.new_tokens / runs[len(runs) // 2], "warmup_s": warmup,
                      "tokens": out[0, ids.shape[1]:].tolist()}))


def run_setting(args: argparse.Namespace, model_dir: str, adapter: str, setting: tuple) -> dict:
    kind, cache, comp, weights = setting
    cmd = [sys.executable, __file__, "--worker", "--model-dir", model_dir, "--adapter", adapter,
           "--adapter-kind", kind, "--cache", cache, "--weights", weights, "--threads", str(args.threads),
           "--new_tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    cmd += ["--compile"] if comp else []
    cmd += ["--tiny"] if args.quick else []
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed generates per process (median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="tiny random Llama, 8 tokens (a smoke test)")
    p.add_argument("--formats", nargs="+", choices=WEIGHTS, default=list(WEIGHTS), help="weight formats to run")
    p.add_argument("--targets", default="q_proj,v_proj", help="the adapter's targets: names, comma-separated, or "
                   "all-linear")
    p.add_argument("--no-compile", dest="compile_rows", action="store_false",
                   help="skip the torch.compile rows (each compiles for 1-1.5 minutes)")
    for name in ("--worker", "--compile", "--tiny"):
        p.add_argument(name, action="store_true", help=argparse.SUPPRESS)
    for name, default in (("--model-dir", ""), ("--adapter", ""), ("--adapter-kind", "base"),
                          ("--cache", "dynamic"), ("--weights", "fp32")):
        p.add_argument(name, default=default, help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as work:
        if args.quick:
            args.new_tokens, args.repeats = 8, 1
            model_dir = make_tiny(os.path.join(work, "tiny"))
        else:
            from lorakit.models import resolve_model

            model_dir = str(resolve_model(args.model))
        adapter = os.path.join(work, "adapter")
        make_adapter(model_dir, adapter,
                     targets=args.targets if args.targets == "all-linear" else args.targets.split(","))
        results = []
        for setting in settings(args.formats, args.compile_rows):
            res = run_setting(args, model_dir, adapter, setting)
            results.append({"adapter": setting[0], "cache": setting[1], "compile": setting[2],
                            "weights": setting[3], **res})
            print(json.dumps({k: v for k, v in results[-1].items() if k != "tokens"}), flush=True)
    import torch

    print(f"\nbatch 1, greedy, {args.new_tokens} new tokens, {args.threads} threads, median of {args.repeats} "
          f"generates after a warm-up, one fresh process per row; torch {torch.__version__}")
    print("| adapter | weights | cache | compile | tok/s | warm-up (compile) s | tokens = eager dynamic fp32 |")
    print("|---|---|---|---|---:|---:|---|")
    for r in results:
        ref = next((x for x in results if x["adapter"] == r["adapter"] and x["weights"] == "fp32"
                    and x["cache"] == "dynamic" and not x["compile"]), {})
        if "error" in r:
            print(f"| {r['adapter']} | {r['weights']} | {r['cache']} | {r['compile']} | failed: {r['error'][:80]} |||")
            continue
        if "tokens" not in ref:
            same = "-"
        elif r["tokens"] == ref["tokens"]:
            same = "yes"
        else:
            agree = sum(a == b for a, b in zip(r["tokens"], ref["tokens"], strict=True))
            same = f"{agree}/{len(ref['tokens'])} positions"
        print(f"| {r['adapter']} | {r['weights']} | {r['cache']} | {'yes' if r['compile'] else 'no'} | "
              f"{r['tokens_per_s']:.1f} | {r['warmup_s']:.1f} | {same} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
