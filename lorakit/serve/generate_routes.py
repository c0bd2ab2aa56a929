"""`/v1/completions` and `/v1/chat/completions`: OpenAI's request and response shapes, streaming as SSE.

A request with k prompts and n choices becomes k engine jobs sharing one event queue; choice index
`prompt·n + i`, as OpenAI numbers them. Streams end with `data: [DONE]`; with `stream_options.include_usage`
a last chunk with empty `choices` carries the usage; a mid-stream error is a `data: {"error": ...}` event.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from .api import Server
from .jobs import Job
from .sampling import Sampling
from .schemas import ChatRequest, CompletionRequest, ServeError

OPENAI_DEFAULT_MAX_TOKENS = 16  # /v1/completions' documented default


def add_generate_routes(app: FastAPI, server: Server) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await server.parse(request, CompletionRequest)
        server.need_kind("causal_lm", "/v1/completions")
        adapter = server.target(body.model)
        return await _generate(server, request, body, adapter, _prompts(server, body.prompt), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await server.parse(request, ChatRequest)
        server.need_kind("causal_lm", "/v1/chat/completions")
        adapter = server.target(body.model)
        tok = server.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ServeError(400, f"{server.settings.base_id!r} has no chat template in its tokenizer; use "
                                  "/v1/completions", code="wrong_task")
        text = tok.apply_chat_template([{"role": m.role, "content": m.text()} for m in body.messages],
                                       add_generation_prompt=True, tokenize=False)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        return await _generate(server, request, body, adapter, [prompt], chat=True)


def _prompts(server: Server, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise ServeError(400, "prompt: expected a string, a list of strings or token ids", param="prompt")
    vocab = server.engine.model.config.vocab_size
    out = []
    for p in prompt:
        ids = server.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p)
        if not ids or any(not 0 <= t < vocab for t in ids):
            raise ServeError(400, f"prompt: empty, or a token id outside [0, {vocab})", param="prompt")
        out.append(ids)
    return out


def _sampling(server: Server, body, prompts: list[list[int]], chat: bool) -> Sampling:
    ctx, longest = server.engine.max_context, max(len(p) for p in prompts)
    if longest >= ctx:
        raise ServeError(400, f"the prompt has {longest} tokens; this model's maximum context length is {ctx} "
                              "tokens; shorten it", param="prompt" if not chat else "messages",
                         code="context_length_exceeded")
    asked = body.max_completion_tokens or body.max_tokens
    limit = server.settings.max_tokens
    if asked is not None and (asked > limit or longest + asked > ctx):
        raise ServeError(400, f"max_tokens={asked} is over the limit: at most {min(limit, ctx - longest)} for this "
                              f"prompt of {longest} tokens (context {ctx}, server limit {limit})",
                         param="max_tokens", code="max_tokens_exceeded")
    default = min(limit, ctx - longest) if chat else min(OPENAI_DEFAULT_MAX_TOKENS, ctx - longest)
    return Sampling(asked or default, body.temperature, body.top_p, body.stop_list(), body.seed)


async def _generate(server: Server, request: Request, body, adapter: str | None, prompts: list[list[int]],
                    chat: bool):
    sampling = _sampling(server, body, prompts, chat)
    loop = asyncio.get_running_loop()
    shared: asyncio.Queue = asyncio.Queue()
    jobs = [Job("generate", adapter, body.model, loop, prompt=p, sampling=sampling, n=body.n, offset=k * body.n,
                queue=shared) for k, p in enumerate(prompts)]
    try:
        for job in jobs:
            server.submit(job)
    except ServeError:
        for job in jobs:
            job.cancel()
        raise
    meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{time.time_ns():x}", "created": int(time.time()),
            "model": body.model}
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(server, request, jobs, meta, chat, usage), media_type="text/event-stream")
    texts, reasons, usage = [""] * (len(jobs) * body.n), [None] * (len(jobs) * body.n), _Usage()
    async for event in _events(server, request, jobs, poll_disconnect=True):
        if event[0] == "text":
            texts[event[1]] += event[2]
        elif event[0] == "finish":
            reasons[event[1]] = event[2]
        elif event[0] == "done":
            usage.add(event[1])
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                    "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices,
            "usage": usage.body()}


class _Usage:
    def __init__(self) -> None:
        self.prompt = self.completion = 0

    def add(self, u: dict) -> None:
        self.prompt += u["prompt_tokens"]
        self.completion += u["completion_tokens"]

    def body(self) -> dict:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion}


async def _events(server: Server, request: Request, jobs: list[Job], poll_disconnect: bool,
                  tick: float = 1.0) -> AsyncIterator[tuple]:
    """The jobs' events until every job is done; ("tick",) on idle seconds. Cancels the jobs however it ends."""
    deadline, done, q = time.monotonic() + server.settings.timeout, 0, jobs[0].queue
    try:
        while done < len(jobs):
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServeError(408, f"request timed out after {server.settings.timeout:g} s",
                                 type="timeout_error", code="timeout")
            try:
                event = await asyncio.wait_for(q.get(), min(tick, left))
            except TimeoutError:
                if poll_disconnect and await request.is_disconnected():
                    raise ServeError(499, "client disconnected") from None
                yield ("tick",)
                continue
            if event[0] == "error":
                raise event[1]
            done += event[0] == "done"
            yield event
    finally:
        for job in jobs:
            job.cancel()


def _chunk(meta: dict, chat: bool, index: int, text: str | None, reason: str | None, role: bool = False) -> str:
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
    body = {**meta, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [choice]}
    return f"data: {json.dumps(body)}\n\n"


async def _sse(server: Server, request: Request, jobs: list[Job], meta: dict, chat: bool,
               include_usage: bool) -> AsyncIterator[str]:
    usage = _Usage()
    try:
        if chat:
            for i in range(len(jobs) * jobs[0].n):
                yield _chunk(meta, chat, i, None, None, role=True)
        async for event in _events(server, request, jobs, poll_disconnect=False):
            if event[0] == "tick":
                yield ": keep-alive\n\n"  # comments are ignored by clients; a gone client fails this send
            elif event[0] == "text":
                yield _chunk(meta, chat, event[1], event[2], None)
            elif event[0] == "finish":
                yield _chunk(meta, chat, event[1], None, event[2])
            elif event[0] == "done":
                usage.add(event[1])
        if include_usage:
            body = {**meta, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [],
                    "usage": usage.body()}
            yield f"data: {json.dumps(body)}\n\n"
    except ServeError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:  # also when the client went away mid-stream: its generation stops at the next step
        for job in jobs:
            job.cancel()
    yield "data: [DONE]\n\n"
