"""What trains: one function per method, all feeding the same loop so comparisons are fair.

    lora    inject LoRA (A, B) on the targets; the head (+ extra_trainable) trains in full as modules_to_save
    full    every parameter
    top-k   the last k transformer blocks + the head (FT-Top2 with k = 2)
    bitfit  every bias (LayerNorm biases included) + the head
    head    the head only (a linear probe)
    adapter, adapter-l, prefix, prompt   the paper's AdapterH, AdapterL, PreLayer, PreEmbed baselines + the head
                                         (bottleneck.py, prefix.py)

`prepare` mutates the model (freezing, injecting) and `param_groups` builds AdamW groups: no weight decay
on vectors (biases, norm weights), and LoRA+ puts every B matrix in a group with lr · lora_plus_ratio.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import Tensor, nn

from lorakit.adapters import lora_modules
from lorakit.config import LoraConfig
from lorakit.errors import LoraConfigError
from lorakit.injection import inject
from lorakit.layers import LoraModule
from lorakit.train.config import TrainConfig
from lorakit.train.tasks import PEFT_TASK_TYPES

_HEAD_ATTRS = ("classifier", "score", "qa_outputs")


def head_names(model: nn.Module, kind: str) -> list[str]:
    """The task head's module names: e.g. ["classifier"] (BERT), ["score"] (GPT-2 classification).

    For a causal LM the output layer is the head only when it is not tied to the input embeddings
    (GPT-2 ties them: training it would train the embeddings), so usually there is none.
    """
    if kind != "causal_lm":
        return [n for n in _HEAD_ATTRS if isinstance(getattr(model, n, None), nn.Module)]
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or out.weight is inp.weight:
        return []
    return [n for n, m in model.named_modules() if m is out]


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The longest ModuleList of same-type blocks (encoder.layer, h, layers): the transformer stack."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if (isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(b) for b in module}) == 1
                and (best is None or len(module) > len(best[1]))):
            best = (name, module)
    if best is None:
        raise LoraConfigError(f"method top-k: no list of transformer blocks found in {type(model).__name__}; "
                              "use method full, bitfit, head or lora for this model")
    return best


def _unfreeze(model: nn.Module, names: list[str]) -> None:
    for name in names:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)


def _check_modules(model: nn.Module, names: list[str]) -> None:
    top = [n for n, _ in model.named_modules() if n and n.count(".") < 2]
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise LoraConfigError(f"extra_trainable={name!r}: no such module; modules include {top[:12]}") from None


def prepare(model: nn.Module, config: TrainConfig, kind: str, base_path: str | None = None) -> nn.Module:
    """Make exactly the method's parameters trainable (injecting LoRA for method lora); returns the model."""
    heads = head_names(model, kind)
    extra = [q for n in config.extra_trainable for q in _qualify(model, n)]
    _check_modules(model, extra)
    if config.method == "head" and not heads:
        raise LoraConfigError(f"method 'head' needs a task head, and this {kind} model has none (its output layer "
                              "is tied to the input embeddings); use lora, bitfit, top-k or full")
    if config.method == "lora":
        lora = LoraConfig(r=config.r, alpha=config.alpha, dropout=config.dropout, targets=config.targets,
                          bias=config.bias, use_rslora=config.use_rslora, modules_to_save=heads + extra,
                          base_model_name_or_path=base_path, task_type=PEFT_TASK_TYPES[kind])
        return inject(model, lora)
    for p in model.parameters():
        p.requires_grad_(config.method == "full")
    if config.method == "top-k":
        name, blocks = transformer_blocks(model)
        if config.top_k > len(blocks):
            raise LoraConfigError(f"top_k={config.top_k} but the model has {len(blocks)} blocks ({name}); "
                                  f"use top_k <= {len(blocks)}")
        _unfreeze(model, [f"{name}.{i}" for i in range(len(blocks) - config.top_k, len(blocks))])
    elif config.method == "bitfit":
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.requires_grad_(True)
    elif config.method in STRUCTURAL_METHODS:
        install_structure(model, config)  # new modules: trainable from birth
    _unfreeze(model, heads + extra)
    return model


STRUCTURAL_METHODS = ("adapter", "adapter-l", "prefix", "prompt")


def install_structure(model: nn.Module, config: TrainConfig) -> None:
    """Add the new modules of an adapter/prefix/prompt method (also when rebuilding a trained run)."""
    from lorakit.train.bottleneck import add_adapters
    from lorakit.train.prefix import add_prefix, add_prompt

    if config.method in ("adapter", "adapter-l"):
        style = "houlsby" if config.method == "adapter" else "lin"
        add_adapters(model, transformer_blocks(model), style, config.bottleneck)
    elif config.method == "prefix":
        if config.gradient_checkpointing:
            raise LoraConfigError("method prefix with gradient_checkpointing=True: a recomputed layer would append "
                                  "to the prefix's key/value cache twice; set gradient_checkpointing to False")
        add_prefix(model, config.prefix_length)
    elif config.method == "prompt":
        add_prompt(model, config.prefix_length)


def _qualify(model: nn.Module, name: str) -> list[str]:
    # "pooler" -> ["bert.pooler"]: accept a suffix as inject's modules_to_save does. A glob ("*LayerNorm") names
    # every module whose full name matches it, the outermost of nested matches (the inner ones train with it).
    if not any(c in name for c in "*?["):
        hits = [n for n, _ in model.named_modules() if n == name or n.endswith("." + name)]
        return [min(hits, key=len) if hits else name]
    hits = [n for n, _ in model.named_modules() if n and fnmatch.fnmatchcase(n, name)]
    if not hits:
        raise LoraConfigError(f"extra_trainable={name!r}: the pattern matches no module; modules include "
                              f"{[n for n, _ in model.named_modules() if n][:12]}")
    return [n for n in hits if not any(n.startswith(h + ".") for h in hits)]


def lora_b_params(model: nn.Module) -> set[int]:
    """ids of the active adapters' B factors, as the layers declare them (LoRA+ gives them their own lr)."""
    out = set()
    for _, m in lora_modules(model):
        if isinstance(m, LoraModule):
            out |= {id(m.B(n)) for n in m.active}
    return out


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """AdamW groups over the trainable parameters, in a fixed order (so optimizer state can be resumed).

    lr = config.lr, or config.lr · lora_plus_ratio for B; weight_decay = config.weight_decay for
    tensors of 2+ dims, 0 for vectors (biases, LayerNorm weights).
    """
    b_ids = lora_b_params(model)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in b_ids, p.dim() >= 2), []).append(p)
    return [{"params": params, "lr": config.lr * (config.lora_plus_ratio if is_b else 1.0),
             "weight_decay": config.weight_decay if decay else 0.0}
            for (is_b, decay), params in sorted(groups.items())]


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """{name: detached CPU copy} of every trainable parameter."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy `state` (from trainable_state) into the model's parameters; names must match exactly."""
    params = dict(model.named_parameters())
    missing = sorted(set(state) - set(params))
    if missing:
        raise LoraConfigError(f"{len(missing)} saved tensors have no parameter in the model, e.g. {missing[:3]}; "
                              "was the state saved from another model or method?")
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise LoraConfigError(f"{name}: saved shape {tuple(value.shape)} != model shape "
                                      f"{tuple(params[name].shape)}; load it onto the model it was trained on")
            params[name].copy_(value)


__all__ = ["head_names", "lora_b_params", "load_trainable_state", "param_groups", "prepare", "trainable_state",
           "transformer_blocks"]
