"""Text generation with or without adapters, on transformers' `generate`.

    texts = generate(model, tokenizer, ["name : Zizzi | eatType : pub ||"], max_new_tokens=64)

The model is whatever the caller built: a bare base, a base with an unmerged lorakit adapter (the LoRA
layers run in the forward), or a merged one (`lorakit.merge`). lorakit adds only what `generate` leaves to
its caller: left padding so every row's last prompt token sits at the end, batches sorted by length (and
the results put back in prompt order), the chat template for instruct models, stop strings trimmed from
the returned text, and a sampling seed that leaves the global RNG as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .decode_plan import decode_plan
from .errors import LoraConfigError

Messages = list[dict[str, str]]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompts(tokenizer, prompts: Sequence[str | Messages], chat: bool) -> list[str]:
    """The exact text each prompt becomes. chat=True: the tokenizer's chat template with the assistant's
    generation prompt (a string prompt is one user message); chat=False: the string as is."""
    if not chat:
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise ValueError(f"chat=False takes string prompts, got {type(bad[0]).__name__}; pass chat=True for "
                             "message lists")
        return list(prompts)
    if not has_chat_template(tokenizer):
        raise ValueError(f"chat=True but tokenizer {type(tokenizer).__name__} has no chat template; pass "
                         "chat=False (plain prompts) or use an instruct model's tokenizer")
    convs = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
    return [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]


def trim_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


@contextmanager
def _left_padding(tokenizer):
    """Pad on the left (decoder-only: new tokens follow every row's own last prompt token), with eos as
    the pad token where there is none (GPT-2); the tokenizer is restored afterwards."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: Sequence[str | Messages], *, max_new_tokens: int = 128,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, num_beams: int = 1,
             stop: Sequence[str] = (), chat: bool | None = None, batch_size: int = 8, seed: int = 0,
             static_cache: bool = False) -> list[str]:
    """The completion of every prompt (new text only, special tokens dropped, cut at the first stop string).

    chat: None = use the chat template when the tokenizer has one. Plain prompts are tokenized without
    special tokens, exactly as lorakit's causal-LM training tokenizes them. Greedy by default; beam search
    with num_beams > 1; sampling with do_sample (temperature, top_p, seeded by `seed`). Rows are decoded
    in batches of `batch_size`, sorted by prompt length (less padding), with the KV cache.
    static_cache: a fixed-shape KV cache (transformers' "static"), what a `compile_for_decoding` model needs to
    reuse its compiled step; the tokens are the same as with the default dynamic cache.
    """
    if max_new_tokens < 1 or batch_size < 1 or num_beams < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}, batch_size={batch_size}, num_beams={num_beams}: "
                         "each must be >= 1")
    if isinstance(prompts, str):
        prompts = [prompts]
    texts = render_prompts(tokenizer, prompts, has_chat_template(tokenizer) if chat is None else chat)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token; set "
                         "tokenizer.pad_token first")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "num_beams": num_beams,
               "pad_token_id": pad_id, "eos_token_id": tokenizer.eos_token_id}
    if do_sample:
        options |= {"temperature": temperature, "top_p": top_p}
    else:  # a checkpoint's generation_config may carry sampling values; greedy must not warn about them
        options |= {"temperature": None, "top_p": None, "top_k": None}
    if stop:
        options |= {"stop_strings": list(stop), "tokenizer": tokenizer}
    if static_cache:
        options["cache_implementation"] = "static"
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    out: list[str] = [""] * len(texts)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        # decode_plan: an unmerged adapter's LoRA terms fused per group of layers (no effect on a bare base)
        with _left_padding(tokenizer), torch.random.fork_rng(devices=[]), decode_plan(model):
            torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                enc = tokenizer([texts[i] for i in rows], add_special_tokens=False, padding=True,
                                return_tensors="pt").to(device)
                ids = model.generate(**enc, **options)[:, enc["input_ids"].shape[1]:]  # (rows, new)
                for i, row in zip(rows, ids, strict=True):
                    out[i] = trim_stop(tokenizer.decode(row, skip_special_tokens=True), stop)
    finally:
        model.train(was_training)
    return out


def compile_for_decoding(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile `model.forward` with torch.compile for fixed shapes (use with `generate(static_cache=True)`).

    Measured on SmolLM2 at batch 1 (benchmarks/decode_levers.py, 2 threads): 1.15-1.3x faster decoding after a
    one-off 60-90 s compilation per process, so it pays for long or many generations only. LoRA layers, merged or
    not, trace without graph breaks. Needs a C compiler for the default inductor backend.
    """
    model.forward = torch.compile(model.forward, dynamic=False, backend=backend)
    return model


def load_for_generation(model: str | None = None, adapter: str | None = None,
                        merge: bool = False, weights: str = "dense") -> tuple[nn.Module, object, bool]:
    """(model, tokenizer, plain) for `lorakit generate`: a bare base, or a base with an adapter.

    adapter: the RUN/adapter of a `lorakit train` run (any method; its task.json names base and format)
    or a bare PEFT-layout LoRA directory. model: a directory or a bundled name; default the adapter's
    base, else smollm2. plain: the run was trained on plain "prompt ||" text (not chat), so prompts
    should be given that way. merge: fold the LoRA adapter into the weights (same outputs, base speed).
    weights: "int8" quantizes the base's Linear weights per channel, "int4" in groups of 32 (`lorakit.quant`, LoRA
    kept unmerged in fp32): faster batch-1 decoding on SmolLM2 here (benchmarks/RESULTS.md), outputs close to fp32.
    """
    from lorakit.quant import check_weights, quantize

    check_weights(weights)
    if weights != "dense" and merge:
        raise LoraConfigError(f"merge=True with weights={weights!r}: a quantized base serves its adapter unmerged; "
                              f"drop one of them (--merge or --weights {weights})")
    from pathlib import Path

    from lorakit.adapters import merge as merge_adapters
    from lorakit.train.tasks import load_model, load_tokenizer, resolve_model_path

    plain = False
    if adapter is not None and (Path(adapter).parent / "task.json").is_file():
        from lorakit.train.inference import load_trained

        net, tokenizer, info = load_trained(adapter, model)
        if info["kind"] != "causal_lm":
            raise LoraConfigError(f"adapter {adapter} was trained for {info['kind']} ({info['task']}); generation "
                                  "needs a causal-LM run (use `lorakit predict` for classifiers)")
        plain = info["task"] != "chat"
    else:
        base = model
        if base is None and adapter is not None:
            from lorakit.adapter_file import read_adapter

            base = read_adapter(adapter).config.base_model_name_or_path
        base = resolve_model_path(base or "smollm2")
        net, tokenizer = load_model(base, "causal_lm", []), load_tokenizer(base)
        if adapter is not None:
            from lorakit.io import load_adapter

            load_adapter(net, adapter)
    if merge:
        merge_adapters(net)
    quantize(net, weights)
    return net.eval(), tokenizer, plain


__all__ = ["generate", "load_for_generation", "compile_for_decoding", "has_chat_template", "render_prompts",
           "trim_stop"]
