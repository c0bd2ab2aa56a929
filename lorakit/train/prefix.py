"""Prefix-layer tuning (PreLayer, Li & Liang 2021) and prefix-embedding tuning (PreEmbed, prompt tuning).

    PreLayer: every attention layer l attends to p trainable key/value vectors before the real tokens:
              attn_l(x) = softmax(q [P_k,l ; k(x)]ᵀ / √h) [P_v,l ; v(x)]      P_k,l, P_v,l: (kv_heads, p, head_dim)
    PreEmbed: p trainable input embeddings are prepended to the token embeddings: [P ; E(x)], P: (p, d).

Trainable values (L layers, d = hidden size, d_kv = kv_heads · head_dim, = d without grouped-query attention):
    PreLayer: L · 2 · p · d_kv        PreEmbed: p · d

Both work as PEFT's prefix and prompt tuning do, so PEFT is the reference the tests compare with: PreLayer
hands the model a transformers cache pre-filled with the prefix (so the real tokens' positions start at p,
as if the prefix were p real tokens before them) and extends the attention mask; PreEmbed feeds
inputs_embeds with the prompt in front and drops the prompt's positions from per-token logits (token
classification, language modelling). Both are installed as forward hooks on the task model, so every
base parameter keeps its name. Both start from the activations (PreLayer) or embeddings (PreEmbed) of p
random vocabulary tokens, the "real words" initialisation Li & Liang and Lester et al. found stable.

Both work with transformers' `generate` (tested greedy against PEFT on Llama).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorakit.errors import LoraConfigError

# Untuned starting points (no reparameterisation MLP, so higher than Li & Liang's 5e-5; prompt tuning is
# known to need a large lr); the lr-sweep experiment tunes them on dev.
PREFIX_LR = 1e-2
PREFIX_BATCH = 32
PROMPT_LR = 3e-2
PROMPT_BATCH = 32
# The paper's PreLayer/PreEmbed rows use on the order of 10 virtual tokens (l_p + l_i); scaled models keep it.
DEFAULT_LENGTH = 10


def attention_geometry(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) from the model's config (BERT, Llama, GPT-2 names)."""
    c = getattr(model, "config", None)
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", None)
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None)
    d = getattr(c, "hidden_size", None) or getattr(c, "n_embd", None)
    if not all(isinstance(v, int) for v in (layers, heads, d)):
        raise LoraConfigError(f"{type(model).__name__}: its config names no layer count / heads / hidden size; "
                              "prefix tuning needs a transformers model (BERT, Llama, GPT-2 families)")
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or d // heads
    return layers, kv_heads, head_dim


class PrefixKV(nn.Module):
    """The trainable prefix: key and value, each (layers, kv_heads, p, head_dim)."""

    def __init__(self, keys: Tensor, values: Tensor) -> None:
        super().__init__()
        self.key = nn.Parameter(keys.detach().clone())
        self.value = nn.Parameter(values.detach().clone())

    @property
    def length(self) -> int:
        return self.key.shape[2]

    def fill(self, cache, batch: int, config) -> object:
        """`cache` (empty, or None for a new DynamicCache) holding the prefix for `batch` rows; the model
        appends the real tokens to it."""
        from transformers import DynamicCache

        cache = DynamicCache(config=config) if cache is None else cache
        for layer in range(self.key.shape[0]):
            shape = (batch, *self.key.shape[1:])
            cache.update(self.key[layer].unsqueeze(0).expand(shape), self.value[layer].unsqueeze(0).expand(shape),
                         layer)
        return cache


def _random_tokens(model: nn.Module, length: int) -> Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    return torch.randint(0, vocab, (1, length))  # the global RNG: seeded by the training loop


@torch.no_grad()
def _real_word_kv(model: nn.Module, length: int) -> tuple[Tensor, Tensor]:
    """Keys and values, (layers, kv_heads, p, head_dim), of p random vocabulary tokens run through the model."""
    from transformers import DynamicCache

    layers, _, _ = attention_geometry(model)
    ids = _random_tokens(model, length).to(model.get_input_embeddings().weight.device)
    cache = DynamicCache(config=model.config)
    was_training = model.training
    model.eval()
    model.base_model(input_ids=ids, past_key_values=cache, use_cache=True)
    model.train(was_training)
    if len(cache.layers) != layers:
        raise LoraConfigError(f"{type(model).__name__}: its attention layers did not fill a key/value cache; "
                              "prefix tuning supports BERT, Llama and GPT-2 style models")
    return (torch.stack([cache.layers[i].keys[0] for i in range(layers)]),
            torch.stack([cache.layers[i].values[0] for i in range(layers)]))


def _batch_size(kwargs: dict) -> tuple[int, int, torch.device]:
    ref = kwargs.get("input_ids")
    ref = ref if ref is not None else kwargs.get("inputs_embeds")
    if ref is None:
        raise LoraConfigError("prefix/prompt tuning: the model was called without input_ids or inputs_embeds")
    return ref.shape[0], ref.shape[1], ref.device


def _prefix_hook(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Put the prefix in front of the real tokens: in the (empty) cache, the attention mask and the positions.

    The real tokens take positions p, p+1, ... as if the prefix were p tokens before them; with `generate`,
    later steps find the prefix already in the cache and only get the mask and positions shifted.
    """
    if args:
        kwargs = {"input_ids": args[0], **kwargs}  # the loop passes keywords; accept a positional input_ids
    prefix = model.lorakit_prefix
    batch, seq, device = _batch_size(kwargs)
    cache = kwargs.get("past_key_values")
    if cache is None or cache.get_seq_length() == 0:
        kwargs["past_key_values"] = cache = prefix.fill(cache, batch, model.config)
    mask = kwargs.get("attention_mask")
    if mask is None:  # every slot visible: the prefix, the cached tokens, the new ones
        kwargs["attention_mask"] = torch.ones(batch, cache.get_seq_length() + seq, dtype=torch.long, device=device)
    elif mask.dim() != 2:
        raise LoraConfigError(f"prefix tuning: expected a (batch, seq) attention mask, got shape {tuple(mask.shape)}")
    else:
        kwargs["attention_mask"] = _with_mask(kwargs, batch, seq, prefix.length, device)
    for name in ("cache_position", "position_ids"):
        if kwargs.get(name) is not None:
            kwargs[name] = kwargs[name] + prefix.length
    return (), kwargs


def add_prefix(model: nn.Module, length: int = DEFAULT_LENGTH) -> PrefixKV:
    """Install PreLayer: `model.lorakit_prefix` (trainable) and the hook that feeds it; returns the prefix."""
    if length < 1:
        raise LoraConfigError(f"prefix_length={length}: expected an integer >= 1")
    if hasattr(model, "lorakit_prefix") or hasattr(model, "lorakit_prompt"):
        raise LoraConfigError("this model already has a prefix or prompt; install one on a fresh model")
    keys, values = _real_word_kv(model, length)
    prefix = PrefixKV(keys, values)
    model.lorakit_prefix = prefix
    model.register_forward_pre_hook(_prefix_hook, with_kwargs=True)
    return prefix


class PromptEmbedding(nn.Module):
    """The trainable prompt: (p, d) input embeddings prepended to every sequence."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())


def _prompt_pre_hook(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Prepend the prompt to the embeddings (and to mask, token types, positions). A `generate` decoding step
    (a filled cache) holds the prompt already: its mask and positions only shift by p."""
    if args:
        kwargs = {"input_ids": args[0], **kwargs}
    batch, seq, device = _batch_size(kwargs)
    prompt = model.lorakit_prompt.weight
    p = prompt.shape[0]
    cache = kwargs.get("past_key_values")
    if cache is not None and cache.get_seq_length() > 0:
        return (), _shift_for_decoding(kwargs, cache.get_seq_length(), batch, seq, p, device)
    embeds = kwargs.pop("inputs_embeds", None)
    ids = kwargs.pop("input_ids", None)
    embeds = embeds if embeds is not None else model.get_input_embeddings()(ids)
    kwargs["attention_mask"] = _with_mask(kwargs, batch, seq, p, device)
    embeds = torch.cat([prompt.unsqueeze(0).expand(batch, -1, -1).to(embeds.dtype), embeds], 1)
    embeds.lorakit_prompt = p  # tells the post hook these logits have the prompt's positions in front
    kwargs["inputs_embeds"] = embeds
    for name in ("token_type_ids", "position_ids"):
        if kwargs.get(name) is not None:
            value = kwargs[name]
            front = torch.zeros(batch, p, dtype=value.dtype, device=device)
            if name == "position_ids":  # the prompt takes positions 0..p-1, the tokens shift by p
                front, value = torch.arange(p, device=device).expand(batch, p), value + p
            kwargs[name] = torch.cat([front, value], 1)
    if kwargs.get("cache_position") is not None:  # generate's prefill: positions of prompt + tokens
        kwargs["cache_position"] = torch.arange(p + seq, device=device) + kwargs["cache_position"][0]
    return (), kwargs


def _shift_for_decoding(kwargs: dict, cached: int, batch: int, seq: int, p: int, device: torch.device) -> dict:
    mask = kwargs.get("attention_mask")
    if mask is None:
        kwargs["attention_mask"] = torch.ones(batch, cached + seq, dtype=torch.long, device=device)
    else:
        kwargs["attention_mask"] = _with_mask(kwargs, batch, seq, p, device)
    for name in ("cache_position", "position_ids"):
        if kwargs.get(name) is not None:
            kwargs[name] = kwargs[name] + p
    return kwargs


def _with_mask(kwargs: dict, batch: int, seq: int, p: int, device: torch.device) -> Tensor:
    mask = kwargs.get("attention_mask")
    mask = torch.ones(batch, seq, dtype=torch.long, device=device) if mask is None else mask
    return torch.cat([torch.ones(batch, p, dtype=mask.dtype, device=device), mask], 1)


def _prompt_post_hook(model: nn.Module, args: tuple, kwargs: dict, output):
    logits = getattr(output, "logits", None)
    embeds = kwargs.get("inputs_embeds")
    p = getattr(embeds, "lorakit_prompt", 0)
    if p and logits is not None and logits.dim() == 3 and logits.shape[1] == embeds.shape[1]:
        # per-token logits of prompt + tokens: drop the prompt's (generate's prefill keeps only the last)
        output.logits = logits[:, p:]
    return output


def add_prompt(model: nn.Module, length: int = DEFAULT_LENGTH) -> PromptEmbedding:
    """Install PreEmbed: `model.lorakit_prompt` (trainable) and the hooks that prepend it; returns the prompt."""
    if length < 1:
        raise LoraConfigError(f"prefix_length={length}: expected an integer >= 1")
    if hasattr(model, "lorakit_prefix") or hasattr(model, "lorakit_prompt"):
        raise LoraConfigError("this model already has a prefix or prompt; install one on a fresh model")
    embedding = model.get_input_embeddings()
    with torch.no_grad():
        weight = embedding(_random_tokens(model, length).to(embedding.weight.device))[0]
    prompt = PromptEmbedding(weight)
    model.lorakit_prompt = prompt
    model.register_forward_pre_hook(_prompt_pre_hook, with_kwargs=True)
    model.register_forward_hook(_prompt_post_hook, with_kwargs=True)
    return prompt


__all__ = ["DEFAULT_LENGTH", "PREFIX_BATCH", "PREFIX_LR", "PROMPT_BATCH", "PROMPT_LR", "PrefixKV", "PromptEmbedding",
           "add_prefix", "add_prompt", "attention_geometry"]
