"""Inference latency of one forward pass (the LoRA paper's Table 1): the base model, LoRA merged, LoRA unmerged,
AdapterH and AdapterL, at several batch sizes and sequence lengths; mean ± std over trials, and the overhead
over the base in %, as the paper prints it.

    python benchmarks/latency.py                                  # SmolLM2 (lorakit.models), batch 1/8/32 x 128/256
    python benchmarks/latency.py --model DIR --trials 20          # any transformers model directory
    python benchmarks/latency.py --model DIR --batches 1 --seqs 16 --trials 3     # a smoke test

Every variant is built from one loaded copy of the base, so the weights are the same; LoRA targets q, v at
rank --r (its B is randomised, so the unmerged path computes a real update); the adapters use bottleneck
--bottleneck (0 = hidden / 32, lorakit's default). Variants alternate inside each trial round, so a slow
moment of a shared machine hits them all alike. The paper's finding: adapters add 2-30% (most at batch 1,
short sequences); merged LoRA adds nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("base", "lora-merged", "lora-unmerged", "adapter-h", "adapter-l")


def resolve(model: str) -> str:
    """A model directory: the argument itself, or a bundled model name through lorakit.models (if present)."""
    if Path(model).is_dir():
        return model
    try:
        from lorakit.models import resolve_model
    except ImportError:
        sys.exit(f"--model {model!r}: not a directory, and this lorakit has no lorakit.models to resolve names; "
                 "pass a transformers model directory")
    return str(resolve_model(model))


def load(path: str, dtype: torch.dtype):
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(path)
    cls = tf.AutoModel if config.model_type in ("bert", "roberta", "distilbert") else tf.AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=dtype).eval()


def build(base, variant: str, r: int, bottleneck: int):
    """A copy of the base with one variant installed, in eval mode."""
    from lorakit import LoraConfig, inject, merge_and_unload
    from lorakit.layers import LoraModule
    from lorakit.train.bottleneck import Bottleneck, add_adapters
    from lorakit.train.methods import transformer_blocks

    model = copy.deepcopy(base)
    if variant.startswith("lora"):
        inject(model, LoraConfig(r=r, alpha=2 * r, targets=None))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoraModule):
                    B = m.B("default")
                    B.copy_(torch.randn(B.shape, generator=g) * 0.01)
        if variant == "lora-merged":
            model = merge_and_unload(model)  # W0 + s·BA in plain layers: what a merged deployment runs
    elif variant.startswith("adapter"):
        add_adapters(model, transformer_blocks(model), "houlsby" if variant == "adapter-h" else "lin", bottleneck)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, Bottleneck):
                    m.up.weight.normal_(0, 0.01)
    return model.eval()


def measure(models: dict, batch: int, seq: int, trials: int, warmup: int, device: torch.device) -> dict[str, list]:
    """Seconds per forward for each variant; variants alternate within each round."""
    vocab = next(iter(models.values())).get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for i in range(warmup + trials):
            for name, model in models.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(input_ids=ids)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    return times


def table(results: list[dict]) -> str:
    head = f"{'batch':>5} {'seq':>5} {'base (ms)':>16}" + "".join(f"{v:>16}" for v in VARIANTS[1:])
    lines = [head, "-" * len(head)]
    for row in results:
        base = row["base"]["mean_ms"]
        cells = [f"{row['batch']:>5} {row['seq']:>5} {base:>9.2f} ±{row['base']['std_ms']:>5.2f}"]
        for v in VARIANTS[1:]:
            m = row[v]["mean_ms"]
            cells.append(f"{m:>8.2f} ({100 * (m - base) / base:+5.1f}%)")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="model directory or bundled name (default smollm2)")
    ap.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    ap.add_argument("--seqs", default="128,256", help="comma-separated sequence lengths")
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--r", type=int, default=8, help="LoRA rank (targets: the architecture's q, v)")
    ap.add_argument("--bottleneck", type=int, default=0, help="adapter bottleneck; 0 = hidden size / 32")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    base = load(resolve(args.model), dtype)
    models = {v: build(base, v, args.r, args.bottleneck).to(device) for v in VARIANTS}
    print(f"model {args.model}, {args.device} {args.dtype}, {torch.get_num_threads()} threads, "
          f"{args.trials} trials after {args.warmup} warm-up; mean ± std per forward pass", flush=True)
    results = []
    for batch in map(int, args.batches.split(",")):
        for seq in map(int, args.seqs.split(",")):
            times = measure(models, batch, seq, args.trials, args.warmup, device)
            row = {"batch": batch, "seq": seq}
            for v, ts in times.items():
                row[v] = {"mean_ms": 1e3 * statistics.mean(ts), "std_ms": 1e3 * (statistics.stdev(ts) if len(ts) > 1
                                                                                    else 0.0)}
            results.append(row)
            print(table([row]).splitlines()[-1] if len(results) > 1 else table([row]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
