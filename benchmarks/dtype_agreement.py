"""How close `--dtype bf16` and `--weights int8/int4` serve to the fp32 default, on SmolLM2 (not a timing).

The server's own path (load_base, adapters installed by the registry, a mixed prefill, decode steps from the slot
tables): E2E prompts, half the rows under LoRA adapters (q,v r=8, random nonzero B as in serve_load.py), greedy.
Per configuration against fp32:
  teacher-forced  every step fed fp32's tokens: max |Δlogit| / max |fp32 logit|, and how often the argmax agrees
  free-running    each config's own greedy tokens: sequences identical to fp32's, and the mean first position
                  where they differ (= the length when identical)

    python benchmarks/dtype_agreement.py                 # 8 prompts x 32 tokens, ~2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CONFIGS = [("bf16", "dense"), ("fp32", "int8"), ("bf16", "int8"), ("fp32", "int4"), ("bf16", "int4")]


def load(mdir: Path, root: Path, names: list[str], dtype: str, weights: str):
    from lorakit.serve.registry import AdapterRegistry
    from lorakit.serve.server import load_base

    model, tok, _, _ = load_base(mdir, root, dtype, weights)
    registry = AdapterRegistry(root, len(names))
    for n in names:
        registry.install(model, registry.plan(model, n, root / n, threading.Lock()))
    return model, tok


@torch.inference_mode()
def run(model, tok, prompts: list[str], names: list[str | None], steps: int, forced=None) -> torch.Tensor:
    """(rows, steps, vocab) fp32 logits as the engine computes them; steps fed `forced` tokens when given."""
    from lorakit.row_tables import RowTables
    from lorakit.serve.engine import _rows
    from lorakit.serve.kv import GrowingCache, KVBatch, left_pad

    ids = [tok(p)["input_ids"] for p in prompts]
    x, mask, pos = left_pad(ids, tok.pad_token_id)
    with _rows(names):
        out = model(input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=GrowingCache(),
                    logits_to_keep=1)
    batch, logits = KVBatch(out.past_key_values, mask, [len(i) for i in ids]), [out.logits[:, -1].float()]
    tables = RowTables(len(prompts))
    tables.sync(model, names)
    for k in range(1, steps):
        last = (forced[:, k - 1] if forced is not None else logits[-1].argmax(-1))[:, None]
        mask, pos = batch.step_inputs()
        with _rows(names, tables):
            logits.append(model(input_ids=last, attention_mask=mask, position_ids=pos,
                                past_key_values=batch.cache).logits[:, -1].float())
        batch.stepped(mask)
    return torch.stack(logits, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from serve_load import make_adapters, prompts

    from lorakit.serve.server import model_dir

    mdir = model_dir("smollm2")
    root = Path(tempfile.mkdtemp(prefix="dtype-agreement-"))
    adapters = make_adapters(str(mdir), root, args.prompts // 2)
    texts = prompts(args.prompts)
    names = [adapters[i // 2] if i % 2 == 0 else None for i in range(args.prompts)]  # adapter, base, adapter, ...
    ref = run(*load(mdir, root, adapters, "fp32", "dense"), texts, names, args.tokens)
    ref_tokens = ref.argmax(-1)
    print(f"SmolLM2-135M, {args.prompts} E2E prompts (half under LoRA adapters), {args.tokens} greedy tokens, "
          "against fp32:")
    print("| dtype | weights | max abs logit diff / max abs fp32 logit | argmax agrees (teacher-forced) | "
          "sequences equal | mean first difference |\n|---|---|---|---|---|---|")
    for dtype, weights in CONFIGS:
        model, tok = load(mdir, root, adapters, dtype, weights)
        forced = run(model, tok, texts, names, args.tokens, forced=ref_tokens)
        own = run(model, tok, texts, names, args.tokens).argmax(-1)
        rel = float((forced - ref).abs().max() / ref.abs().max())
        agree = float((forced.argmax(-1) == ref_tokens).float().mean())
        differ = [(own[i] != ref_tokens[i]).nonzero() for i in range(args.prompts)]
        first = [int(d[0]) if d.numel() else args.tokens for d in differ]
        print(f"| {dtype} | {weights} | {rel:.4f} | {agree:.1%} | {sum(f == args.tokens for f in first)}/"
              f"{args.prompts} | {statistics.mean(first):.1f} |", flush=True)
        del model


if __name__ == "__main__":
    main()
