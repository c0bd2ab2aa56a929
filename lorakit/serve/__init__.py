"""lorakit serve: an OpenAI-compatible server, one frozen base and many LoRA adapters chosen per request.

    api (FastAPI routes, OpenAI shapes) → engine (one thread owns the model; continuous batching of mixed
    adapters) → registry (adapter names, safe paths, LRU) → metrics (prometheus_client)

Entry points: `lorakit.serve.server.build(ServeConfig(...))` / `run(...)`, or
`lorakit serve --model ... --adapters ...`.
"""
