"""The HTTP surface: FastAPI routes in OpenAI's (and vLLM's) shapes, auth, body limits, errors.

Generation routes live in generate_routes.py; this file has the app, the shared request plumbing and the
other routes (health, models, embeddings, classify, adapter load/unload, metrics).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError

from .engine import Engine
from .jobs import Job
from .registry import check_name
from .schemas import ClassifyRequest, EmbeddingRequest, LoadLoraRequest, ServeError, UnloadLoraRequest


@dataclass
class Settings:
    base_id: str
    kind: str  # "causal_lm" | "encoder"
    api_key: str | None = None
    max_body: int = 1 << 20
    timeout: float = 600.0
    max_tokens: int = 2048  # the most a request may ask for


class Server:
    """What the routes share: the engine (which owns the model), the registry, metrics and settings."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine, self.settings = engine, settings
        self.registry, self.metrics, self.tokenizer = engine.registry, engine.metrics, engine.tokenizer

    async def parse(self, request: Request, model: type[BaseModel]) -> BaseModel:
        body = await request.body()
        if len(body) > self.settings.max_body:
            raise ServeError(413, f"request body of {len(body)} bytes is over the limit of {self.settings.max_body}")
        try:
            data = json.loads(body)
        except ValueError as e:
            raise ServeError(400, f"the body is not valid JSON: {e}") from None
        if isinstance(data, dict) and isinstance(data.get("model"), str):
            request.state.model = data["model"]  # for the error metrics
        try:
            return model.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(x) for x in first["loc"])
            raise ServeError(400, f"{loc or 'body'}: {first['msg']} ({len(e.errors())} problem(s))",
                             param=loc or None) from None

    def target(self, name: str) -> str | None:
        """The adapter a `model` field names (None = the base); 400 for an unsafe name, 404 if unknown."""
        if name == self.settings.base_id:
            return None
        check_name(name)
        self.registry.path_of(name)
        return name

    def need_kind(self, kind: str, what: str) -> None:
        if self.settings.kind != kind:
            raise ServeError(400, f"{what} needs a {'causal language model' if kind == 'causal_lm' else 'encoder'} "
                                  f"base, but this server runs {self.settings.base_id!r} "
                                  f"({self.settings.kind}); start a server with a suitable --model",
                             code="wrong_task")

    def submit(self, job: Job) -> None:
        self.metrics.requests.labels(job.label).inc()
        self.engine.submit(job)

    async def result(self, request: Request, job: Job) -> tuple:
        """Wait for a job's one result event; cancel it on timeout or a client that went away."""
        deadline = time.monotonic() + self.settings.timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServeError(408, f"request timed out after {self.settings.timeout:g} s",
                                     type="timeout_error", code="timeout")
                try:
                    event = await asyncio.wait_for(job.queue.get(), min(1.0, left))
                except TimeoutError:
                    if await request.is_disconnected():
                        raise ServeError(499, "client disconnected") from None
                    continue
                if event[0] == "error":
                    raise event[1]
                return event
        finally:
            job.cancel()  # a no-op for a finished job; stops one still queued or running


def error_response(e: ServeError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def create_app(server: Server) -> FastAPI:
    """The FastAPI app serving `server`; routes in OpenAI's shapes."""
    from .generate_routes import add_generate_routes

    app = FastAPI(title="lorakit serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    s = server.settings

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if s.api_key and request.url.path != "/health":
            if request.headers.get("authorization", "") != f"Bearer {s.api_key}":
                return error_response(ServeError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                                 type="authentication_error", code="invalid_api_key"))
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > s.max_body:
            return error_response(ServeError(413, f"request body of {size} bytes is over the limit of "
                                                  f"{s.max_body}"))
        return await call_next(request)

    @app.exception_handler(ServeError)
    async def on_serve_error(request: Request, e: ServeError):
        model = getattr(request.state, "model", None)
        if not getattr(e, "counted", False) and model is not None and (  # known names only: bounded labels
                model == s.base_id or server.registry.is_loaded(model) or model in server.registry.names()):
            server.metrics.errors.labels(model, str(e.status)).inc()
        return error_response(e)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, e: Exception):
        return error_response(ServeError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    @app.get("/health")
    async def health():
        if server.engine.draining or not server.engine.thread.is_alive():
            return error_response(ServeError(503, "draining" if server.engine.draining else "the engine has stopped",
                                             type="server_error", code="draining" if server.engine.draining
                                             else "engine_stopped"))
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        base = {"id": s.base_id, "object": "model", "created": created, "owned_by": "lorakit", "root": s.base_id,
                "parent": None}
        items = [base]
        for name in server.registry.names():
            try:
                root = str(server.registry.path_of(name))
            except ServeError:
                continue
            items.append({"id": name, "object": "model", "created": created, "owned_by": "lorakit", "root": root,
                          "parent": s.base_id, "loaded": server.registry.is_loaded(name)})
        return {"object": "list", "data": items}

    add_admin_routes(app, server)
    add_encoder_routes(app, server)
    add_generate_routes(app, server)
    return app


def add_admin_routes(app: FastAPI, server: Server) -> None:
    @app.post("/v1/load_lora_adapter")
    async def load_lora(request: Request):
        body = await server.parse(request, LoadLoraRequest)
        name = check_name(body.lora_name)
        if server.registry.is_loaded(name) or name in server.registry.extra:
            raise ServeError(400, f"The lora adapter '{name}' has already been loaded; unload it first",
                             param="lora_name")
        path = server.registry.check_load_path(name, body.lora_path)
        on_disk = server.registry.root / name
        if on_disk.exists() and on_disk.resolve() != path and path.parent != on_disk.resolve():
            raise ServeError(400, f"lora_name {name!r} is the name of adapter directory {on_disk}, with other files; "
                                  "pick another name", param="lora_name")
        server.registry.register(name, path)
        try:
            planning = await asyncio.wrap_future(server.engine.call(lambda: server.engine.load_async(name)))
            await asyncio.wrap_future(planning)  # validation on the loader thread; raises what it found
            await asyncio.wrap_future(server.engine.call(server.engine.finish_loads))  # install between steps
        except ServeError:
            server.registry.forget(name)
            raise
        except Exception as e:  # noqa: BLE001 - whatever validation found, as a 400 naming the file
            server.registry.forget(name)
            raise ServeError(400, f"adapter {name!r} at {path} failed validation: {e}", code="adapter_invalid",
                             param="lora_path") from None
        if not server.registry.is_loaded(name):
            server.registry.forget(name)
            raise ServeError(400, f"adapter {name!r} at {path} could not be installed", code="adapter_invalid")
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(request: Request):
        body = await server.parse(request, UnloadLoraRequest)
        name = check_name(body.lora_name)
        registered = server.registry.forget(name)
        if not server.registry.is_loaded(name):
            if registered:
                return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
            raise ServeError(404, f"The lora adapter '{name}' cannot be found.", code="model_not_found",
                             param="lora_name")
        freed = await _unload_when_idle(server, name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully ({freed} bytes freed).")


async def _unload_when_idle(server: Server, name: str) -> int:
    """Unload between steps once no running or queued request uses the adapter; the bytes freed."""
    deadline = time.monotonic() + server.settings.timeout
    while True:
        def attempt() -> int | None:
            if name in server.engine.in_use():
                return None
            return server.engine.unload(name) if server.registry.is_loaded(name) else 0
        freed = await asyncio.wrap_future(server.engine.call(attempt))
        if freed is not None:
            return freed
        if time.monotonic() > deadline:
            raise ServeError(409, f"adapter {name!r} stayed in use; retry the unload", code="adapter_busy")
        await asyncio.sleep(0.05)


def add_encoder_routes(app: FastAPI, server: Server) -> None:
    s = server.settings

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await server.parse(request, EmbeddingRequest)
        adapter = server.target(body.model)
        inputs, n_tokens = _encode_inputs(server, body.input)
        job = Job("embed", adapter, body.model, asyncio.get_running_loop(), inputs=inputs)
        server.submit(job)
        vectors = (await server.result(request, job))[1]
        data = [{"object": "embedding", "index": i, "embedding": _vector(v, body.encoding_format)}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    @app.post("/v1/classify")
    async def classify(request: Request):
        body = await server.parse(request, ClassifyRequest)
        server.need_kind("encoder", "/v1/classify")
        adapter = server.target(body.model)
        if adapter is None:
            raise ServeError(400, f"{s.base_id!r} has no trained classification head; name an adapter trained "
                                  "with one in `model`", param="model", code="wrong_task")
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if any(isinstance(t, list) and len(t) != 2 for t in texts):
            raise ServeError(400, "input: a sentence pair is a list of exactly two strings", param="input")
        first = [t[0] if isinstance(t, list) else t for t in texts]
        second = [t[1] for t in texts] if all(isinstance(t, list) for t in texts) else None
        if second is None and any(isinstance(t, list) for t in texts):
            raise ServeError(400, "input: give all inputs as pairs or none", param="input")
        inputs = server.tokenizer(first, second, padding=True, return_tensors="pt")
        _check_length(server, inputs["input_ids"].shape[1])
        job = Job("classify", adapter, body.model, asyncio.get_running_loop(), inputs=dict(inputs))
        server.submit(job)
        probs = (await server.result(request, job))[1]
        labels = server.registry.labels.get(adapter) or [str(server.engine.model.config.id2label.get(i, i))
                                                         for i in range(probs.shape[1])]
        n = int(inputs["attention_mask"].sum())
        data = [{"index": i, "label": labels[int(p.argmax())], "probs": [float(x) for x in p],
                 "num_classes": len(p)} for i, p in enumerate(probs)]
        return {"id": f"classify-{time.time_ns():x}", "object": "list", "created": int(time.time()),
                "model": body.model, "data": data, "usage": {"prompt_tokens": n, "total_tokens": n}}


def _check_length(server: Server, n: int) -> None:
    if n > server.engine.max_context:
        raise ServeError(400, f"an input has {n} tokens; this model's maximum context length is "
                              f"{server.engine.max_context} tokens; shorten it", param="input",
                         code="context_length_exceeded")


def _encode_inputs(server: Server, given) -> tuple[dict[str, torch.Tensor], int]:
    """A right-padded batch from strings or token ids, and its number of real tokens."""
    if isinstance(given, str):
        given = [given]
    if given and isinstance(given[0], int):
        given = [given]
    if not given or any(isinstance(g, list) and not g for g in given):
        raise ServeError(400, "input: expected a non-empty string, list of strings or token ids", param="input")
    if isinstance(given[0], str):
        batch = server.tokenizer(list(given), padding=True, return_tensors="pt")
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    else:
        vocab = server.engine.model.config.vocab_size
        if any(not 0 <= t < vocab for g in given for t in g):
            raise ServeError(400, f"input: token ids must be in [0, {vocab})", param="input")
        width = max(len(g) for g in given)
        ids = torch.full((len(given), width), server.engine.pad_id, dtype=torch.long)
        mask = torch.zeros(len(given), width, dtype=torch.long)
        for i, g in enumerate(given):
            ids[i, :len(g)], mask[i, :len(g)] = torch.tensor(g), 1
        inputs = {"input_ids": ids, "attention_mask": mask}
    _check_length(server, inputs["input_ids"].shape[1])
    return inputs, int(inputs["attention_mask"].sum())


def _vector(v: torch.Tensor, encoding: str) -> list[float] | str:
    if encoding == "base64":  # what the official SDK asks for by default: little-endian float32
        return base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in np.asarray(v)]
