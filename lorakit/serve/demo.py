"""The end of `make demo`: serve the adapter a run just trained and classify sentences through the HTTP API."""

from __future__ import annotations

from pathlib import Path

import httpx

from .server import ServeConfig, ThreadedServer, free_port


def classify_over_http(run_dir: str | Path, sentences: list[str], model: str = "minilm") -> tuple[list[dict], str]:
    """Start `lorakit serve` on 127.0.0.1 over the run's parent directory, POST /v1/classify with the run's name,
    stop the server; returns the answers ({"label", "probs"} per sentence) and the command that serves it by hand.
    """
    run_dir = Path(run_dir).resolve()
    cfg = ServeConfig(model=model, adapters=str(run_dir.parent), port=free_port())
    server = ThreadedServer(cfg)
    try:
        r = httpx.post(f"{server.url}/classify", json={"model": run_dir.name, "input": sentences}, timeout=120)
        r.raise_for_status()
        answers = [{"label": d["label"], "probs": d["probs"]} for d in r.json()["data"]]
    finally:
        server.close()
    command = f"lorakit serve --model {model} --adapters {run_dir.parent} --port 8000"
    return answers, command
