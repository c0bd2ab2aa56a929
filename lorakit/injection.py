"""Where LoRA goes: select target modules (a pure function), swap in LoRA layers, freeze the rest, activate.

This is the bottom of the model-level code: `adapters` and `io` build on `lora_modules`, `lora_configs`,
`activate` and `inject` from here, never the other way round.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .config import LoraConfig, matches
from .embedding_conv import LoraConv, LoraEmbedding
from .errors import AdapterNotFound, LoraConfigError, LoraStateError
from .layers import LoraLinear, LoraModule
from .quant import QUANTIZED
from .saved import SavedModule
from .sliced import LoraSlicedLinear
from .transaction import all_or_nothing

# The paper's Wq, Wv per architecture (model.config.model_type).
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "deberta", "deberta-v2"], ["query", "value"]),
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    **dict.fromkeys(["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "phi3"], ["q_proj", "v_proj"]),
    **dict.fromkeys(["t5", "mt5"], ["q", "v"]),
}
# Fused projections whose default adapts only some output slices (GPT-2's c_attn holds q, k, v).
DEFAULT_SLICES: dict[str, dict[str, list[bool]]] = {"gpt2": {"c_attn": [True, False, True]}}
HEAD_NAMES = ("classifier", "score", "lm_head", "qa_outputs")
_WRAPPER_CHILDREN = ("base_layer", "original_module", "modules_to_save")


def _conv1d_type() -> type | None:
    try:  # transformers is optional: only needed to recognise GPT-2's Conv1D
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def layer_table() -> list[tuple[type, Callable[..., LoraModule]]]:
    """Base layer type -> LoRA constructor(base, fan_in_fan_out, slices). One line per layer type."""
    table: list[tuple[type, Callable[..., LoraModule]]] = [
        ((nn.Linear, *QUANTIZED), lambda m, fifo, sl: _linear(m, False, sl)),
        (nn.Embedding, lambda m, fifo, sl: LoraEmbedding(m)),
        ((nn.Conv1d, nn.Conv2d, nn.Conv3d), lambda m, fifo, sl: LoraConv(m)),
    ]
    conv1d = _conv1d_type()
    if conv1d is not None:
        table.insert(0, (conv1d, lambda m, fifo, sl: _linear(m, fifo is not False, sl)))
    return table


def _linear(base: nn.Module, fan_in_fan_out: bool, slices: list[bool] | None) -> LoraLinear:
    if slices is None or all(slices):
        return LoraLinear(base, fan_in_fan_out=fan_in_fan_out)
    return LoraSlicedLinear(base, slices, fan_in_fan_out=fan_in_fan_out)


def _is_linear(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return isinstance(module, (nn.Linear, *QUANTIZED)) or (conv1d is not None and isinstance(module, conv1d))


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, LoraModule) or any(isinstance(module, t) for t, _ in layer_table())


def model_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for the model's own modules: the root and the insides of lorakit wrappers left out."""
    for name, module in model.named_modules():
        if name and not any(p in _WRAPPER_CHILDREN for p in name.split(".")):
            yield name, module


def candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules LoRA could wrap, seen through existing LoRA wrappers."""
    return ((name, module) for name, module in model_modules(model) if _adaptable(module))


def _head_names(model: nn.Module) -> set[str]:
    heads = {n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        heads |= {n for n, m in model.named_modules() if m is out}
    return heads


def resolve(model: nn.Module, config: LoraConfig) -> tuple[list[str] | str, dict[str, list[bool]]]:
    """The effective target spec and slices: the config's, or the architecture's default."""
    if config.targets is not None:
        return config.targets, dict(config.slices)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise LoraConfigError(f"targets=None but model type {model_type!r} has no default; pass targets=[...] "
                              f"(e.g. {[n for n, _ in candidates(model)][:5]}) or 'all-linear'; defaults "
                              f"exist for {sorted(DEFAULT_TARGETS)}")
    return DEFAULT_TARGETS[model_type], {**DEFAULT_SLICES.get(model_type, {}), **config.slices}


def select(model: nn.Module, config: LoraConfig) -> list[str]:
    """The names of the modules `inject` will adapt; raises LoraConfigError listing candidates if none."""
    spec, _ = resolve(model, config)
    heads = _head_names(model)
    chosen = []
    for name, module in candidates(model):
        if any(matches(list(config.modules_to_save), prefix) for prefix in _prefixes(name)):
            continue  # inside a module trained in full (e.g. a classifier head): no LoRA there, as PEFT
        base = module.base_layer if isinstance(module, LoraModule) else module
        if spec == "all-linear":
            hit = _is_linear(base) and name not in heads
        else:
            hit = matches(spec, name)
        if hit and not matches(config.exclude, name):
            chosen.append(name)
    if not chosen:
        names = [n for n, _ in candidates(model)]
        raise LoraConfigError(f"targets={spec!r} match no module; candidates ({len(names)}): {names[:20]}"
                              + (" ..." if len(names) > 20 else ""))
    return chosen


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


_NAME = re.compile(r"[A-Za-z0-9._-]+")


def check_adapter_name(name: str, error: type[Exception] = LoraConfigError) -> str:
    """`name` if it is 1-128 characters of [A-Za-z0-9._-], not '.' and without '..' (safe as a directory)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name or name == "." or len(name) > 128:
        raise error(f"adapter name {name!r}: expected 1-128 characters from [A-Za-z0-9._-] without "
                    "'..', e.g. 'sst2-r8'")
    return name


def lora_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The configs of the adapters on `model`, by name (empty if none)."""
    return model.__dict__.setdefault("_lorakit_configs", {})


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoraModule | SavedModule]]:
    """(name, module) for every LoRA layer and saved-module wrapper in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoraModule | SavedModule):
            yield name, module


def is_merged(model: nn.Module) -> bool:
    return any(m.merged for _, m in lora_modules(model) if isinstance(m, LoraModule))


def check_names(model: nn.Module, names: list[str]) -> None:
    """AdapterNotFound naming the first of `names` not on the model, and the ones that are."""
    known = list(lora_configs(model))
    for n in names:
        if n not in known:
            raise AdapterNotFound(f"adapter {n!r} is not on this model; adapters present: {known or 'none'} "
                                  "(add one with inject or load_adapter)")


def activate(model: nn.Module, names: list[str]) -> None:
    """Make `names` the active adapters of every layer (in this order) and make only them trainable."""
    for _, m in lora_modules(model):
        m.active = [n for n in names if n in m.adapter_names]
    refresh_trainable(model)


def active_names(model: nn.Module) -> list[str]:
    """The active adapter names, in activation order."""
    seen: list[str] = []
    for _, m in lora_modules(model):
        seen += [n for n in m.active if n not in seen]
    return seen


def refresh_trainable(model: nn.Module) -> None:
    """requires_grad from the declarations: only active adapters' tensors, and biases per the bias mode."""
    active = active_names(model)
    configs = lora_configs(model)
    for p in model.parameters():
        p.requires_grad_(False)
    modes = {configs[n].bias for n in active if n in configs}
    for _, m in lora_modules(model):
        for n in m.active:
            for p in m.adapter_params(n):
                p.requires_grad_(True)
        if "lora_only" in modes and isinstance(m, LoraModule) and getattr(m.base_layer, "bias", None) is not None:
            m.base_layer.bias.requires_grad_(True)
    if "all" in modes:  # every bias of the model itself: not adapter tensors, not a saved module's frozen original
        skip = {id(p) for _, m in lora_modules(model) for n in m.adapter_names for p in m.adapter_params(n)}
        skip |= {id(p) for _, m in lora_modules(model) if isinstance(m, SavedModule)
                 for p in m.original_module.parameters()}
        for pname, p in model.named_parameters():
            if pname.rsplit(".", 1)[-1] == "bias" and id(p) not in skip:
                p.requires_grad_(True)


def inject(model: nn.Module, config: LoraConfig, name: str = "default", autocast_adapter_dtype: bool = True,
           *, active: bool = True) -> nn.Module:
    """Add adapter `name`: wrap each target in a LoRA layer (in place), freeze the rest, make it active.

    A second call with another name adds an adapter beside the first on the same (or other) modules.
    All or nothing: everything is checked and built before the model changes. A merged model is refused
    (unmerge it first). `autocast_adapter_dtype` (PEFT's name): A and B are fp32 on a bf16/fp16 base, so
    optimizer updates are not rounded away; the forward casts them. `active=False` adds it frozen, unused.
    """
    check_adapter_name(name)
    if name in lora_configs(model):
        raise LoraConfigError(f"adapter {name!r} already exists on the model; pick another name or "
                              f"delete_adapter(model, {name!r}) first")
    if active and is_merged(model):
        raise LoraStateError(f"cannot add and activate adapter {name!r} on a merged model; call unmerge(model) "
                             "first")
    targets, saved = _plan_targets(model, config)
    layers = _build_layers(model, config, targets, name, autocast_adapter_dtype, active)
    copies = [(s, m, m.new_copy(trainable=active)) for s, m in _saved_wrappers(model, saved)]
    with all_or_nothing(model):
        for target, (layer, factors, r, alpha) in layers.items():
            if layer is not model.get_submodule(target):
                _set_submodule(model, target, layer)
            layer.install(name, *factors, r, alpha, config.dropout, config.use_rslora, trainable=active)
        for s, wrapper, copy in copies:
            if wrapper is not model.get_submodule(s):
                _set_submodule(model, s, wrapper)
            wrapper.install(name, copy)
        lora_configs(model)[name] = config
        if active:
            activate(model, [name])
    return model


def _plan_targets(model: nn.Module, config: LoraConfig) -> tuple[list[str], list[str]]:
    names = select(model, config)
    saved = [n for n, _ in model_modules(model) if matches(list(config.modules_to_save), n)]
    missing = [m for m in config.modules_to_save if not any(matches([m], n) for n in saved)]
    if missing:
        raise LoraConfigError(f"modules_to_save={missing} match no module; top-level modules: "
                              f"{[n for n, _ in model.named_children()]}")
    return names, saved


def _build_layers(model: nn.Module, config: LoraConfig, targets: list[str], name: str, fp32: bool,
                  trainable: bool) -> dict[str, tuple[LoraModule, tuple[torch.Tensor, torch.Tensor], int, float]]:
    """Per target: its LoRA layer (existing, or a new wrapper not yet in the model) and the new adapter's factors."""
    _, slices = resolve(model, config)
    out = {}
    for target in targets:
        module = model.get_submodule(target)
        if not isinstance(module, LoraModule):
            slice_spec = next((v for k, v in slices.items() if matches([k], target)), None)
            module = _wrap(module, config.fan_in_fan_out, slice_spec)
        r = config.rank_for(target)
        factors = module.new_factors(r, config.init, module.adapter_dtype(fp32))
        out[target] = (module, factors, r, config.alpha_for(target))
    return out


def _saved_wrappers(model: nn.Module, saved: list[str]) -> list[tuple[str, SavedModule]]:
    out = []
    for s in saved:
        module = model.get_submodule(s)
        out.append((s, module if isinstance(module, SavedModule) else SavedModule(module).train(module.training)))
    return out


def _wrap(module: nn.Module, fan_in_fan_out: bool | None, slices: list[bool] | None) -> LoraModule:
    for base_type, make in layer_table():
        if isinstance(module, base_type):
            return make(module, fan_in_fan_out, slices).train(module.training)
    raise LoraConfigError(f"cannot adapt {type(module).__name__}; supported: "
                          f"{[t.__name__ if isinstance(t, type) else t for t, _ in layer_table()]}")


def count_parameters(model: nn.Module) -> dict[str, float]:
    """{trainable, total, percent}: counted over every parameter, as PEFT's print_trainable_parameters."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


def parameter_table(model: nn.Module) -> str:
    """A printable table: trainable values by kind (LoRA A/B, saved modules, biases, other), and totals."""
    kinds: dict[int, str] = {}  # declared, not found by substring
    for _, m in lora_modules(model):
        for n in m.adapter_names:
            if isinstance(m, LoraModule):
                kinds[id(m.A(n))], kinds[id(m.B(n))] = "LoRA A", "LoRA B"
            else:
                kinds.update(dict.fromkeys(map(id, m.adapter_params(n)), "modules_to_save"))
    groups: dict[str, list[int]] = {}
    for pname, p in model.named_parameters():
        kind = kinds.get(id(p)) or ("bias" if pname.endswith("bias") else "base weights")
        row = groups.setdefault(kind, [0, 0, 0])
        row[0] += 1
        row[1] += p.numel()
        row[2] += p.numel() if p.requires_grad else 0
    c = count_parameters(model)
    lines = [f"{'group':<16}{'tensors':>9}{'values':>14}{'trainable':>14}"]
    lines += [f"{k:<16}{v[0]:>9,}{v[1]:>14,}{v[2]:>14,}" for k, v in sorted(groups.items())]
    n_layers = sum(isinstance(m, LoraModule) for m in model.modules())
    lines.append(f"LoRA layers: {n_layers}; trainable {c['trainable']:,} of {c['total']:,} "
                 f"({c['percent']:.4f}%)")
    return "\n".join(lines)
