"""Load test of `lorakit serve` on loopback, side by side with the baselines users know.

For 1, 8 and 64 distinct adapters (LoRA r=8 on q,v, random nonzero B) at concurrency 1, 8 and 32, it sends a
bounded number of completion requests (greedy, a fixed number of new tokens) and reports generated tokens/s and
p50/p99 latency. In the same run:
  (a) the same server, every request naming the bare base (the ceiling for mixed adapters)
  (b) PEFT, `set_adapter` per request, one request at a time
  (c) PEFT, `adapter_names` mixed batches of `concurrency` rows, static (a batch ends when its longest row does)
  (d) llama.cpp through llama-cpp-python on the GGUF base (Q4_1), no adapter, one request at a time, the same
      prompts, token count, greedy decoding and thread count (skipped with a message if not installed:
      pip install '.[bench]')

    python benchmarks/serve_load.py                     # SmolLM2, the full grid (the lead runs this, alone)
    python benchmarks/serve_load.py --quick             # a tiny random Llama, 2 cells: a smoke test
    python benchmarks/serve_load.py --adapters 1 --concurrency 1 --no-peft --classify-model '' --weights int8
                                                        # single stream, int8 base weights, vs llama.cpp
    python benchmarks/serve_load.py --adapters 64 --concurrency 32 --no-peft --no-llama-cpp --rounds 3 \
        --classify-model ''                             # the mixed-adapter ratio only, 3 alternating rounds

Each round runs every concurrency's cells in turn; "ratio" lines give lorakit serve / the bare base at the same
concurrency (tokens/s), the median over rounds.

Only 127.0.0.1 is ever used. Every cell is bounded by --requests and --cell-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prompts(n: int) -> list[str]:
    lines = (ROOT / "lorakit/data/e2e/valid.txt").read_text(encoding="utf-8").splitlines()
    return [line.split("||")[0] + " ||" for line in lines[:n]]


def make_tiny(path: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.train.conftest import bpe_tokenizer

    tok = bpe_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                      initializer_range=0.2, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def make_adapters(model_dir: str, root: Path, n: int) -> list[str]:
    """n adapters (r=8, q,v) with random nonzero B, saved by lorakit in PEFT's format."""
    from transformers import AutoModelForCausalLM

    import lorakit
    from lorakit.layers import LoraModule

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]))
    names = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoraModule):
                    for p in m.adapter_params("default"):
                        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        lorakit.save_adapter(model, root / f"ad{i:02d}")
        names.append(f"ad{i:02d}")
    return names


def summary(latencies: list[float], tokens: int, wall: float) -> dict:
    lat = sorted(latencies)
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    return {"requests": len(lat), "tokens": tokens, "tok_s": tokens / wall if wall else 0.0,
            "p50_s": p(0.50), "p99_s": p(0.99)}


async def drive(url: str, models: list[str], texts: list[str], concurrency: int, requests: int, max_tokens: int,
                limit_s: float) -> dict:
    """`requests` completions, at most `concurrency` in flight, round-robin over `models`; stops at limit_s."""
    import httpx

    latencies, tokens, sem = [], 0, asyncio.Semaphore(concurrency)
    start = time.perf_counter()

    async def one(client, i):
        nonlocal tokens
        async with sem:
            if time.perf_counter() - start > limit_s:
                return
            t = time.perf_counter()
            r = await client.post(f"{url}/completions", json={"model": models[i % len(models)],
                                                              "prompt": texts[i % len(texts)],
                                                              "max_tokens": max_tokens, "temperature": 0})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t)
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*[one(client, i) for i in range(requests)])
    return summary(latencies, tokens, time.perf_counter() - start)


def peft_set_adapter(model_dir, root, names, texts, requests, max_tokens, limit_s) -> dict:
    """(b) PEFT, set_adapter per request, one request at a time."""
    peft, tok = _peft(model_dir, root, names)
    latencies, tokens, start = [], 0, time.perf_counter()
    for i in range(requests):
        if time.perf_counter() - start > limit_s:
            break
        t = time.perf_counter()
        peft.set_adapter(names[i % len(names)])
        ids = tok(texts[i % len(texts)], return_tensors="pt")
        with torch.no_grad():
            out = peft.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
        tokens += out.shape[1] - ids["input_ids"].shape[1]
        latencies.append(time.perf_counter() - t)
    return summary(latencies, tokens, time.perf_counter() - start)


def peft_mixed_batches(model_dir, root, names, texts, batch, requests, max_tokens, limit_s) -> dict:
    """(c) PEFT adapter_names: static mixed batches of `batch` rows (each request's latency = its batch's)."""
    peft, tok = _peft(model_dir, root, names)
    tok.padding_side = "left"
    latencies, tokens, start = [], 0, time.perf_counter()
    for b in range(0, requests, batch):
        if time.perf_counter() - start > limit_s:
            break
        idx = list(range(b, min(b + batch, requests)))
        ids = tok([texts[i % len(texts)] for i in idx], return_tensors="pt", padding=True)
        t = time.perf_counter()
        with torch.no_grad():
            out = peft.generate(**ids, max_new_tokens=max_tokens, do_sample=False,
                                adapter_names=[names[i % len(names)] for i in idx])
        tokens += (out.shape[1] - ids["input_ids"].shape[1]) * len(idx)
        latencies += [time.perf_counter() - t] * len(idx)
    return summary(latencies, tokens, time.perf_counter() - start)


_PEFT_CACHE: dict = {}


def _peft(model_dir, root, names):
    key = (model_dir, tuple(names))
    if key not in _PEFT_CACHE:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        peft = PeftModel.from_pretrained(model, str(root / names[0]), adapter_name=names[0])
        for n in names[1:]:
            peft.load_adapter(str(root / n), adapter_name=n)
        tok = AutoTokenizer.from_pretrained(model_dir)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        _PEFT_CACHE.clear()
        _PEFT_CACHE[key] = (peft.eval(), tok)
    return _PEFT_CACHE[key]


def llama_cpp(texts, requests, max_tokens, limit_s, threads: int) -> dict | str:
    """(d) llama.cpp on the GGUF base file (found as lorakit.models finds it), no adapter, batch 1, greedy."""
    try:
        from llama_cpp import Llama
    except ImportError:
        note = "skipped: llama-cpp-python is not installed; pip install '.[bench]' installs it (compiles llama.cpp)"
        print(f"(d) llama.cpp {note}", flush=True)
        return note
    from lorakit.models import smollm2_gguf

    llm = Llama(model_path=str(smollm2_gguf()), n_ctx=512, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False)
    llm(texts[0], max_tokens=2, temperature=0)  # warm-up
    latencies, tokens, start = [], 0, time.perf_counter()
    for i in range(requests):
        if time.perf_counter() - start > limit_s:
            break
        t = time.perf_counter()
        out = llm(texts[i % len(texts)], max_tokens=max_tokens, temperature=0, top_k=1)  # greedy
        tokens += out["usage"]["completion_tokens"]
        latencies.append(time.perf_counter() - t)
    return summary(latencies, tokens, time.perf_counter() - start)


def classify_mix_ratio(model_dir: str, adapters: int, batch: int, tokens: int, repeats: int) -> dict:
    """MiniLM classify at batch `batch` × `tokens`: a batch mixing `adapters` adapters (q,v r=8 + head) vs the
    same batch on the base alone, alternating, median of `repeats` ratios (the issue's ≤ 1.10× target)."""
    from transformers import AutoModelForSequenceClassification

    import lorakit

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()
    for i in range(adapters):
        lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, targets=["query", "value"],
                                                 modules_to_save=["classifier"]), f"c{i}")
    ids = torch.randint(1000, 2000, (batch, tokens))
    mixed = [f"c{i % adapters}" for i in range(batch)]

    def run(names):
        t = time.perf_counter()
        with torch.inference_mode(), lorakit.per_row_adapters(model, names):
            model(input_ids=ids)
        return time.perf_counter() - t

    run(mixed), run([None] * batch)
    ratios = [run(mixed) / run([None] * batch) for _ in range(repeats)]
    return {"setup": f"classify batch {batch}x{tokens}, {adapters} adapters mixed / base", "adapters": adapters,
            "concurrency": batch, "ratio_median": statistics.median(ratios), "ratios": ratios}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=64, help="requests per cell (bounded)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--cell-seconds", type=float, default=120.0, help="stop issuing requests after this")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, and llama.cpp's (default 2)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="the server's --dtype")
    ap.add_argument("--weights", default="dense", choices=["dense", "int8", "int4"],
                    help="the server's --weights")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the server's cells, alternating (default 1)")
    ap.add_argument("--no-peft", dest="peft", action="store_false", help="skip baselines (b) and (c)")
    ap.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false", help="skip baseline (d)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--classify-model", default="minilm", help="encoder for the classify cell; '' = skip it")
    ap.add_argument("--classify-repeats", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="tiny random Llama, 2 adapters counts, conc. 1 and 4")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    if args.classify_model:
        from lorakit.models import resolve_model

        args.classify_model = resolve_model(args.classify_model)
    if args.quick:
        args.model, args.adapters, args.concurrency = make_tiny(work / "tiny"), [1, 8], [1, 4]
        args.classify_repeats = 3
        args.requests, args.max_tokens, args.cell_seconds = 8, 8, 20
    results = run_grid(args, work)
    if args.classify_model:
        results.append(classify_mix_ratio(args.classify_model, 64, 64, 64 if not args.quick else 16,
                                          args.classify_repeats))
    print(table(results))
    print(ratios(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


def run_grid(args, work: Path) -> list[dict]:
    from lorakit.serve.server import ServeConfig, ThreadedServer, free_port, model_dir

    mdir = str(model_dir(args.model))
    root = work / "adapters"
    root.mkdir()
    names = make_adapters(mdir, root, max(args.adapters))
    texts = prompts(256)
    srv = ThreadedServer(ServeConfig(model=mdir, adapters=str(root), port=free_port(),
                                     max_loaded=max(args.adapters), max_batch=max(args.concurrency),
                                     max_queue=4096, prompt_cache=0, dtype=args.dtype, weights=args.weights))
    tag = f" [{args.dtype}{'' if args.weights == 'dense' else f', {args.weights} weights'}]"
    rows: list[dict] = []
    bound = (args.requests, args.max_tokens, args.cell_seconds)
    try:
        base = srv.server.settings.base_id
        asyncio.run(drive(srv.url, names[:max(args.adapters)], texts, max(args.concurrency),
                          max(args.adapters), 2, 60))  # warm-up: every adapter loaded once
        for r in range(args.rounds):
            for c in args.concurrency:
                order = [0] + args.adapters if r % 2 == 0 else args.adapters + [0]  # alternate who goes first
                for n in order:
                    setup = "(a) server, bare base" if n == 0 else "lorakit serve"
                    rows.append({"setup": setup + tag, "adapters": n, "concurrency": c, "round": r,
                                 **asyncio.run(drive(srv.url, names[:n] if n else [base], texts, c, *bound))})
    finally:
        srv.close()
    if args.peft:
        for c in args.concurrency:
            for n in args.adapters:
                rows.append({"setup": "(c) PEFT adapter_names static batches", "adapters": n, "concurrency": c,
                             **peft_mixed_batches(mdir, root, names[:n], texts, c, *bound)})
        for n in args.adapters:
            rows.append({"setup": "(b) PEFT set_adapter per request", "adapters": n, "concurrency": 1,
                         **peft_set_adapter(mdir, root, names[:n], texts, *bound)})
    if args.llama_cpp:
        d = llama_cpp(texts, *bound, args.threads) if not args.quick else "skipped: --quick (tiny model has no GGUF)"
        rows.append({"setup": "(d) llama.cpp, GGUF base (Q4_1)", "adapters": 0, "concurrency": 1,
                     **(d if isinstance(d, dict) else {"note": d})})
    return rows


def ratios(rows: list[dict]) -> str:
    """lorakit serve / the bare base (tokens/s) at the same concurrency, the median over rounds."""
    out = []
    for c in sorted({r["concurrency"] for r in rows if "round" in r}):
        base = {r["round"]: r["tok_s"] for r in rows if r.get("round") is not None and r["concurrency"] == c
                and r["adapters"] == 0}
        for n in sorted({r["adapters"] for r in rows if "round" in r and r["adapters"]}):
            each = [r["tok_s"] / base[r["round"]] for r in rows if r.get("round") is not None
                    and r["concurrency"] == c and r["adapters"] == n and base.get(r["round"])]
            if each:
                out.append(f"ratio: {n} adapters / bare base at concurrency {c}: {statistics.median(each):.3f} "
                           f"(rounds: {', '.join(f'{x:.3f}' for x in each)})")
    return "\n".join(out)


def table(rows: list[dict]) -> str:
    out = ["| setup | adapters | concurrency | requests | tokens/s | p50 s | p99 s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ratio_median" in r:
            out.append(f"| {r['setup']} | {r['adapters']} | {r['concurrency']} | | "
                       f"{r['ratio_median']:.3f}x (median of {len(r['ratios'])}) | | |")
        elif "note" in r:
            out.append(f"| {r['setup']} | | | | {r['note']} | | |")
        else:
            out.append(f"| {r['setup']} | {r['adapters']} | {r['concurrency']} | {r['requests']} | "
                       f"{r['tok_s']:.1f} | {r['p50_s']:.3f} | {r['p99_s']:.3f} |")
    med = statistics.median([r["tok_s"] for r in rows if "tok_s" in r] or [0])
    return "\n".join(out) + f"\n(median tokens/s over cells: {med:.1f})"


if __name__ == "__main__":
    main()
