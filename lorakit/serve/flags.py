"""`lorakit serve` flags, one per ServeConfig field (kept free of heavy imports: the CLI builds every parser)."""

from __future__ import annotations

import argparse


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="smollm2 | minilm | a Hugging Face model directory")
    p.add_argument("--adapters", required=True, help="ADAPTERS_DIR: one sub-directory per adapter, named as served")
    p.add_argument("--max-loaded", "--max_loaded", dest="max_loaded", type=int, default=64,
                   help="adapters kept in memory, least recently used evicted (default 64)")
    p.add_argument("--max-batch", "--max_batch", dest="max_batch", type=int, default=32,
                   help="rows decoded together per step, whatever their adapters (default 32)")
    p.add_argument("--max-queue", "--max_queue", dest="max_queue", type=int, default=256,
                   help="requests queued or running before 429 + Retry-After (default 256)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", "--api_key", dest="api_key", default=None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="the base's weights and activations; fp32 (the model's own) makes greedy output equal PEFT's; "
                        "LoRA adapters stay fp32 on a 16-bit base")
    p.add_argument("--weights", default="dense", choices=["dense", "int8", "int4"],
                   help="int8: the base's Linear weights as per-channel int8; int4: in groups of 32 (GGUF Q4_1's "
                        "layout), the LM head int8 (matmuls in bf16, LoRA unquantized); faster decoding at small "
                        "batches, outputs close to but not equal to fp32 (default dense)")
    p.add_argument("--allow-outside-paths", dest="allow_outside_paths", action="store_true",
                   help="let /v1/load_lora_adapter read directories outside ADAPTERS_DIR")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--max-tokens", "--max_tokens", dest="max_tokens", type=int, default=2048,
                   help="the most tokens one request may ask for")
    p.add_argument("--prompt-cache", "--prompt_cache", dest="prompt_cache", type=int, default=4096,
                   help="prompt tokens whose KV is kept, keyed by adapter + tokens; 0 = off (default 4096)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for the model (default 0: torch's own choice, one per core; on the 2-core "
                        "machine of benchmarks/RESULTS.md, 2 decode faster than 1). 1 leaves a core to other work")


def config_from_flags(args: argparse.Namespace):
    from .server import ServeConfig

    return ServeConfig(model=args.model, adapters=args.adapters, max_loaded=args.max_loaded,
                       max_batch=args.max_batch, max_queue=args.max_queue, host=args.host, port=args.port,
                       api_key=args.api_key, dtype=args.dtype, weights=args.weights,
                       allow_outside_paths=args.allow_outside_paths,
                       timeout=args.timeout, max_tokens=args.max_tokens, prompt_cache=args.prompt_cache,
                       threads=args.threads)
