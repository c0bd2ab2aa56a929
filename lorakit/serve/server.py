"""Build and run a server: load the base (frozen, unmerged, its own dtype), start the engine, run uvicorn.

SIGTERM (or Ctrl-C) drains: new requests get 503 and /health turns 503 (a load balancer stops sending),
running and queued requests finish, then uvicorn exits. A second signal exits at once.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn
from safetensors import safe_open

from lorakit.errors import LoraConfigError
from lorakit.quant import check_weights, quantize

from .api import Server, Settings, create_app
from .engine import Engine
from .metrics import Metrics
from .registry import AdapterRegistry, adapter_files
from .threads import in_passing_thread

_ENCODERS = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "albert", "mpnet",
             "camembert", "ernie", "modernbert"}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOOPBACK = "127.0.0.1"


@dataclass
class ServeConfig:
    model: str  # smollm2 | minilm | a Hugging Face model directory
    adapters: str  # ADAPTERS_DIR: one sub-directory per adapter (its name)
    max_loaded: int = 64  # adapters kept in memory (LRU)
    max_batch: int = 32  # rows in the running batch
    max_queue: int = 256  # queued + running requests before 429
    host: str = LOOPBACK
    port: int = 8000
    api_key: str | None = None
    dtype: str = "fp32"  # the base's weights; fp32 = the model's own, so greedy equals PEFT's
    weights: str = "dense"  # "int8" / "int4": the base's Linear weights quantized at load (lorakit.quant)
    allow_outside_paths: bool = False  # let load_lora_adapter read outside ADAPTERS_DIR
    timeout: float = 600.0  # seconds per request
    max_tokens: int = 2048  # the most tokens one request may ask for
    max_body: int = 1 << 20  # bytes
    prompt_cache: int = 4096  # prompt tokens whose KV is kept (keyed by adapter + tokens); 0 = off
    drain_timeout: float = 60.0
    threads: int = 0  # the engine thread's torch intra-op threads (threads.py); 0 = leave torch's default


def model_dir(spec: str) -> Path:
    """A local model directory for `spec`: a bundled name (smollm2, minilm) or a path."""
    from lorakit.models import resolve_model

    path = Path(resolve_model(spec))
    if not (path / "config.json").is_file():
        raise LoraConfigError(f"--model {spec!r}: not a Hugging Face model directory (no config.json); pass a "
                              "directory or a bundled name (smollm2, minilm)")
    return path


def _head_size(root: Path) -> int | None:
    """The class count of the first adapter under `root` that saves a classifier head."""
    for sub in sorted(root.iterdir()):
        weights = adapter_files(sub) / "adapter_model.safetensors"
        if not weights.is_file():
            continue
        try:
            with safe_open(str(weights), "pt") as f:
                for key in f.keys():
                    if key.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
                        return f.get_slice(key).get_shape()[0]
        except (OSError, ValueError, RuntimeError):
            continue
    return None


def load_base(path: Path, adapters: Path, dtype: str = "fp32", weights: str = "dense"):
    """(model, tokenizer, kind, max_context) for the base in `path`; kind is 'causal_lm' or 'encoder'.
    weights="int8"/"int4" quantizes its Linear layers (heads that adapters replace excepted; lorakit.quant) before
    anything serves."""
    import transformers as tf
    from transformers.utils import logging

    logging.set_verbosity_error()
    if dtype not in _DTYPES:
        raise LoraConfigError(f"--dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
    check_weights(weights)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    kind = "encoder" if config.get("model_type") in _ENCODERS else "causal_lm"
    torch.manual_seed(0)  # an encoder's base head is random: the same on every replica
    if kind == "encoder":
        model = tf.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=_head_size(adapters) or 2, dtype=_DTYPES[dtype])
    else:
        model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype])
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # for embeddings/classify; generation pads itself, on the left
    for p in model.parameters():
        p.requires_grad_(False)
    quantize(model, weights)
    limit = config.get("max_position_embeddings") or config.get("n_positions") or 2048
    return model.eval(), tokenizer, kind, int(limit)


def build(cfg: ServeConfig) -> Server:
    """A ready server (engine started) for `cfg`."""
    if cfg.threads < 0:
        raise LoraConfigError(f"--threads {cfg.threads}: expected 0 (torch's default) or a positive count")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    registry = AdapterRegistry(cfg.adapters, cfg.max_loaded, cfg.allow_outside_paths)

    def load() -> tuple[Path, tuple]:
        path = model_dir(cfg.model)  # converts a bundled model on first use: torch ops too
        return path, load_base(path, registry.root, cfg.dtype, cfg.weights)

    path, (model, tokenizer, kind, context) = in_passing_thread(load)  # threads.py: one OpenMP pool
    engine = Engine(model, tokenizer, kind, registry, Metrics(), cfg.max_batch, cfg.max_queue, cfg.prompt_cache,
                    context)
    base_id = cfg.model if not Path(cfg.model).is_dir() else path.name
    settings = Settings(base_id, kind, cfg.api_key, cfg.max_body, cfg.timeout, min(cfg.max_tokens, context))
    engine.start()
    return Server(engine, settings)


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains the engine before the usual graceful exit."""

    def __init__(self, config: uvicorn.Config, engine: Engine, drain_timeout: float) -> None:
        super().__init__(config)
        self.engine, self.drain_timeout = engine, drain_timeout

    def handle_exit(self, sig: int, frame) -> None:
        if self.engine.draining:
            return super().handle_exit(sig, frame)
        self.engine.draining = True
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while not self.engine.idle() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.should_exit = True


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class ThreadedServer:
    """A server on 127.0.0.1 in a background thread (tests, benchmarks, demos); `.url` is its /v1 base URL."""

    def __init__(self, cfg: ServeConfig, start_timeout: float = 60.0) -> None:
        self.server = build(cfg)
        self.uv = uvicorn.Server(uvicorn.Config(create_app(self.server), host=cfg.host, port=cfg.port,
                                                log_level="error"))
        self.thread = threading.Thread(target=self.uv.run, name="lorakit-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout
        while not self.uv.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"lorakit serve did not start on {cfg.host}:{cfg.port}")
            time.sleep(0.02)
        self.root = f"http://{cfg.host}:{cfg.port}"
        self.url = f"{self.root}/v1"

    def close(self) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout=10)
        self.server.engine.stop()


def run(cfg: ServeConfig) -> None:
    """Serve until SIGTERM; prints the address and the adapters found."""
    server = build(cfg)
    names = server.registry.names()
    print(f"lorakit serve: {server.settings.base_id} ({server.settings.kind}), {len(names)} adapter(s) in "
          f"{server.registry.root}: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}", flush=True)
    print(f"lorakit serve: http://{cfg.host}:{cfg.port}/v1 (SIGTERM drains)", flush=True)
    config = uvicorn.Config(create_app(server), host=cfg.host, port=cfg.port, log_level="warning",
                            timeout_graceful_shutdown=int(cfg.drain_timeout))
    try:
        DrainingServer(config, server.engine, cfg.drain_timeout).run()
    finally:
        server.engine.stop()


__all__ = ["ServeConfig", "ThreadedServer", "build", "free_port", "load_base", "model_dir", "run"]
