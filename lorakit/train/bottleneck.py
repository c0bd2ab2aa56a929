"""Adapter layers, the LoRA paper's AdapterH and AdapterL baselines: a bottleneck MLP with a residual.

    adapter(h) = h + up(relu(down(norm(h))))        down: (m, d), up: (d, m), norm = LayerNorm (AdapterL) or id

AdapterH (Houlsby et al. 2019): an adapter after the attention output projection and one after the MLP's
output projection of every block, both before the block's residual + LayerNorm. AdapterL (Lin et al. 2020):
one adapter after the MLP only, with a LayerNorm inside. `up` starts at zero, so at init the model computes
exactly what the base computes (as LoRA's B = 0).

Trainable values (d = hidden size, m = bottleneck, L = blocks), the paper's closed forms:
    AdapterH: L · 2 · (2·d·m + d + m)        AdapterL: L · (2·d·m + d + m + 2·d)

m defaults to d / 32, the reduction factor behind the paper's RoBERTa-base AdapterH row (m = 24 at d = 768,
0.9M values): m = 12 on MiniLM (d = 384), m = 18 on SmolLM2-135M (d = 576).
"""

from __future__ import annotations

from torch import Tensor, nn

from lorakit.errors import LoraConfigError

# Untuned starting points for the experiments (Houlsby et al. searched lr in {1e-4, 3e-4, 1e-3}); the
# lr-sweep experiment tunes them on dev.
ADAPTER_LR = 1e-3
ADAPTER_BATCH = 32
REDUCTION = 32

# Inside one transformer block: the attention output projection and the MLP output projection
# (BERT, Llama/Mistral/Qwen, GPT-2). The adapter goes on their output.
_SITES = {"attn": ("attention.output.dense", "self_attn.o_proj", "attn.c_proj"),
          "mlp": ("output.dense", "mlp.down_proj", "mlp.c_proj")}


class Bottleneck(nn.Module):
    """h -> h + up(relu(down(norm(h)))); h: (..., d). up is zero at init, so the module starts as identity."""

    def __init__(self, d: int, m: int, layer_norm: bool = False, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=eps) if layer_norm else nn.Identity()
        self.down = nn.Linear(d, m)  # (m, d): nn.Linear's Kaiming-uniform init
        self.up = nn.Linear(m, d)  # (d, m)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(self.down(self.norm(h)).relu())


class Adapted(nn.Module):
    """A frozen projection followed by an adapter: y = adapter(base_layer(x))."""

    def __init__(self, base_layer: nn.Module, adapter: Bottleneck) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    def forward(self, x: Tensor) -> Tensor:
        return self.adapter(self.base_layer(x))

    def unwrap(self) -> nn.Module:
        return self.base_layer


def hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    d = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not isinstance(d, int):
        raise LoraConfigError(f"{type(model).__name__}: no hidden_size in its config; adapters need a transformers "
                              "model (BERT, Llama, GPT-2 families)")
    return d


def adapter_sites(blocks: nn.ModuleList, prefix: str, kinds: tuple[str, ...]) -> list[str]:
    """Module paths that get an adapter on their output: per block, one per kind ("attn", "mlp")."""
    out = []
    for i, block in enumerate(blocks):
        for kind in kinds:
            hits = [s for s in _SITES[kind] if _has(block, s)]
            if not hits:
                raise LoraConfigError(f"adapters: block {prefix}.{i} ({type(block).__name__}) has none of "
                                      f"{_SITES[kind]}; this architecture is not supported by the adapter methods")
            out.append(f"{prefix}.{i}.{hits[0]}")
    return out


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def add_adapters(model: nn.Module, blocks: tuple[str, nn.ModuleList], style: str, bottleneck: int = 0) -> list[str]:
    """Insert AdapterH (style "houlsby") or AdapterL ("lin") adapters into `blocks` = (path, ModuleList);
    bottleneck 0 = hidden size / 32. Checks every site first, then swaps them all in; returns the paths."""
    if style not in ("houlsby", "lin"):
        raise LoraConfigError(f"adapter style {style!r}: expected houlsby or lin")
    d = hidden_size(model)
    m = bottleneck or max(1, d // REDUCTION)
    sites = adapter_sites(blocks[1], blocks[0], ("attn", "mlp") if style == "houlsby" else ("mlp",))
    wrapped = []
    for path in sites:
        base = model.get_submodule(path)
        if isinstance(base, Adapted):
            raise LoraConfigError(f"{path} already holds an adapter; add adapters to a fresh model")
        ref = next(base.parameters())
        wrapped.append((path, Adapted(base, Bottleneck(d, m, layer_norm=style == "lin").to(ref.device, ref.dtype))))
    for path, module in wrapped:
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, module)
    return sites


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every adapter's parameters, as the Adapted modules declare them."""
    return [p for m in model.modules() if isinstance(m, Adapted) for p in m.adapter.parameters()]


__all__ = ["ADAPTER_BATCH", "ADAPTER_LR", "Adapted", "Bottleneck", "adapter_parameters", "adapter_sites",
           "add_adapters", "hidden_size"]
