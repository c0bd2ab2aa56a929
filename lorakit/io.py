"""Save and load adapters in PEFT's layout, atomically; files are validated in full before the model is touched.

    save_adapter(model, "out/sst2")            # out/sst2/adapter_config.json + adapter_model.safetensors
    name = load_adapter(model, "out/sst2")     # injects from the file's config, or adds beside existing adapters

The file format and the model-free checks live in adapter_file.py; this module adds what needs the model:
which modules the config selects, their shapes, the modules_to_save and bias tensors, and installing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from .adapter_file import (
    CONFIG_NAME,
    LORA_KEYS,
    MAX_WEIGHTS_BYTES,
    PREFIX,
    WEIGHTS_NAME,
    AdapterFile,
    read_adapter,
    to_peft_dict,
)
from .config import LoraConfig, matches
from .errors import AdapterFileError, AdapterNotFound, LoraConfigError
from .injection import _wrap, inject, lora_configs, lora_modules, model_modules, resolve, select
from .injection import check_adapter_name as _check_name
from .layers import LoraModule
from .saved import SavedModule
from .transaction import all_or_nothing

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def check_adapter_name(name: str) -> str:
    """`name` if it is safe as a directory name ([A-Za-z0-9._-], not '.', no '..'), else AdapterFileError."""
    return _check_name(name, AdapterFileError)


def adapter_dir(root: str | Path, name: str) -> Path:
    """The directory of adapter `name` under `root`, with the name checked (no path tricks)."""
    return Path(root) / check_adapter_name(name)


# -- save ------------------------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str | Path, name: str = "default",
                 dtype: str | torch.dtype | None = None) -> Path:
    """Write adapter `name` as PEFT does: `path/adapter_config.json` + `path/adapter_model.safetensors`.

    Keys are `base_model.model.<module>.lora_A.weight` (r, in) / `.lora_B.weight` (out, r); a fused per-slice
    layer is written as the dense full-width adapter it equals (rank r·k, block-sparse B, exact pattern entries).
    `dtype` ("fp32", "bf16", "fp16" or a torch dtype) casts floating tensors. The write is atomic: files go
    to a temporary directory beside `path`, which is then renamed; `path` may only hold a previous adapter.
    """
    configs = lora_configs(model)
    if name not in configs:
        raise AdapterNotFound(f"adapter {name!r} is not on this model; adapters present: {list(configs) or 'none'}")
    cast = _as_dtype(dtype)
    config = configs[name]
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    scales: dict[str, float] = {}
    saved: list[str] = []
    fan_in_fan_out = False
    for mpath, m in lora_modules(model):
        if name not in m.adapter_names:
            continue
        if isinstance(m, SavedModule):  # PEFT's key: the module's own parameter names, no wrapper in them
            tensors.update({f"{PREFIX}{mpath}.{k}": v for k, v in m.copy(name).state_dict().items()})
            saved.append(mpath)
            continue
        A, B = m.dense_factors(name)  # a per-slice layer writes the dense adapter it equals
        a_key, b_key = m.file_keys
        tensors[PREFIX + mpath + a_key], tensors[PREFIX + mpath + b_key] = A, B
        ranks[mpath], scales[mpath] = A.shape[0], m.scale[name]
        fan_in_fan_out |= bool(getattr(m, "fan_in_fan_out", False))
    tensors.update(_bias_tensors(model, config.bias, set(ranks), saved))
    peft = to_peft_dict(config, _target_spec(model, config, ranks), ranks, scales, fan_in_fan_out,
                        config.base_model_name_or_path or getattr(getattr(model, "config", None), "name_or_path",
                                                                  None) or None)
    out = {k: _to_cpu(v, cast) for k, v in tensors.items()}
    files = {CONFIG_NAME: (json.dumps(peft, indent=2, sort_keys=True) + "\n").encode(),
             WEIGHTS_NAME: safetensors.torch.save(out, metadata={"format": "pt"})}
    return write_atomic(Path(path), files)


def _as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise LoraConfigError(f"dtype={dtype!r}: expected 'fp32', 'bf16', 'fp16', a matching torch dtype, or None "
                          "(keep each tensor's dtype)")


def _to_cpu(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    t = t.detach()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.to("cpu").contiguous().clone()  # clone: safetensors refuses tensors sharing memory


def _target_spec(model: nn.Module, config: LoraConfig, ranks: dict[str, int]) -> list[str] | str:
    """The config's target spec if it selects exactly this adapter's modules here, else the explicit list."""
    try:
        spec, _ = resolve(model, config)
        if set(select(model, replace(config, targets=spec))) == set(ranks):
            return spec
    except LoraConfigError:
        pass
    return sorted(ranks)


def _strip(name: str) -> str:
    # "x.query.base_layer.bias" -> "x.query.bias": the parameter's name in the bare model.
    return ".".join(p for p in name.split(".") if p not in ("base_layer", "original_module"))


def _bias_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Bias parameters of the bare model by their bare names (no LoRA factors, no saved copies)."""
    return {_strip(n): p for n, p in model.named_parameters()
            if n.rsplit(".", 1)[-1] == "bias" and ".modules_to_save." not in n and ".lora_" not in n}


def _bias_tensors(model: nn.Module, mode: str, adapted: set[str], saved: list[str]) -> dict[str, Tensor]:
    """Biases under PEFT's keys, as a PEFT model holding only this adapter names them."""
    if mode == "none":
        return {}
    out = {}
    for bare, p in _bias_params(model).items():
        owner, _, leaf = bare.rpartition(".")
        if owner in adapted:
            out[f"{PREFIX}{owner}.base_layer.{leaf}"] = p
        elif mode == "all":
            s = next((s for s in saved if bare.startswith(s + ".")), None)
            out[PREFIX + (f"{s}.original_module.{bare[len(s) + 1:]}" if s else bare)] = p
    return out


def write_atomic(path: str | Path, files: dict[str, bytes]) -> Path:
    """Write `files` into directory `path` all at once: a temporary sibling directory, fsync, then rename.

    A crash at any point leaves either the old directory or the new one under `path`, never a mix or a part.
    An existing `path` may hold only adapter files (a README.md is carried over); anything else is refused.
    """
    path = Path(path)
    known = {CONFIG_NAME, WEIGHTS_NAME, "README.md"} | set(files)
    if path.exists() and (not path.is_dir() or set(os.listdir(path)) - known):
        raise AdapterFileError(f"{path}: exists and holds other files "
                               f"({sorted(set(os.listdir(path)) - known)[:5] if path.is_dir() else 'a file'}); "
                               "refusing to replace it — save into a new or adapter-only directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the adapter directory should read like any other
    old = None
    try:
        if (path / "README.md").is_file() and "README.md" not in files:
            shutil.copy2(path / "README.md", tmp / "README.md")  # PEFT's model card
        for fname, data in files.items():
            with open(tmp / fname, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "adapter")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old / "adapter", path)  # put the previous adapter back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- load ------------------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """Everything to install, computed and checked before the model is changed."""

    config: LoraConfig
    lora: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # target -> (A, B) in the layer's form
    saved: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # saved-module path -> its state dict
    biases: list[tuple[nn.Parameter, Tensor]] = field(default_factory=list)


def load_adapter(model: nn.Module, path: str | Path, name: str | None = None,
                 max_bytes: int = MAX_WEIGHTS_BYTES) -> str:
    """Load a PEFT-layout adapter into `model` as adapter `name`; returns the name.

    With no adapters on the model it injects from the file's config and activates it; beside existing ones it
    is added and the active set (and merged state) stays as it was (activate it with `set_adapter`). `name`
    defaults to "default", or to the directory's name if "default" is taken. The file is validated in full
    (keys, shapes against the config's ranks and the model's modules, dtypes, finiteness) before anything
    changes; every problem raises AdapterFileError naming the file, the key and the fix. A weights file over
    `max_bytes` is refused before it is read. All or nothing: a failure leaves the model as it was.
    """
    path = Path(path)
    configs = lora_configs(model)
    default = "default" if "default" not in configs else path.resolve().name
    name = check_adapter_name(name if name is not None else default)
    if name in configs:
        raise AdapterFileError(f"adapter name {name!r} is already on the model; pass name=... or delete it first")
    adapter = read_adapter(path, max_bytes)
    plan = _plan(model, adapter)
    _install(model, plan, name)
    return name


def _plan(model: nn.Module, adapter: AdapterFile) -> _Plan:
    src = adapter.path / WEIGHTS_NAME
    cfg = adapter.config
    # PEFT adds e.g. "score" for every SEQ_CLS adapter; keep the names that exist in this model.
    names = [n for n, _ in model_modules(model)]
    kept = [m for m in cfg.modules_to_save if any(matches([m], n) for n in names)]
    cfg = replace(cfg, modules_to_save=kept)
    saved = [n for n in names if matches(kept, n)]
    try:  # select() skips modules inside modules_to_save, as PEFT does (e.g. RoBERTa's classifier.dense)
        targets = select(model, cfg)
    except LoraConfigError as e:
        raise AdapterFileError(f"{adapter.path / CONFIG_NAME}: target_modules: {e}") from None
    holding = [t for t in targets for s in saved if s.startswith(t + ".")]
    if holding:
        raise AdapterFileError(f"{adapter.path / CONFIG_NAME}: LoRA target {holding[0]!r} holds a module of "
                               "modules_to_save; PEFT cannot load that either — fix target_modules")
    _check_keys(src, set(targets), set(adapter.lora), "lora_A/lora_B weights for module")
    plan = _Plan(cfg)
    overrides: dict[str, tuple[int, float]] = {}
    _, slices = resolve(model, cfg)
    for t in targets:
        A, B, emb = adapter.lora[t]
        layer = _layer_for(model, t, slices, cfg, src)
        A, B, r = _fit(layer, t, A, B, emb, cfg.rank_for(t), src)
        plan.lora[t] = (A, B)
        if r != A.shape[0] or layer.layer_shapes(r) != layer.factor_shapes(r):  # folded back into slices
            k = A.shape[0] // r
            root = k ** 0.5 if cfg.use_rslora else k
            overrides[t] = (r, cfg.alpha_for(t) / root)
    if overrides:
        plan.config = replace(cfg, rank_pattern=_first({t: r for t, (r, _) in overrides.items()}, cfg.rank_pattern),
                              alpha_pattern=_first({t: a for t, (_, a) in overrides.items()}, cfg.alpha_pattern))
    other = dict(adapter.other)
    for s in saved:
        module = model.get_submodule(s)
        module = module.original_module if isinstance(module, SavedModule) else module
        plan.saved[s] = {}
        for k, ref in module.state_dict().items():
            key = f"{s}.{k}"
            if key not in other:
                raise AdapterFileError(f"{src}: {PREFIX}{key}: missing; modules_to_save lists {s!r}, so the file "
                                       "must hold its full state dict")
            plan.saved[s][k] = _check_like(src, key, other.pop(key), ref)
    plan.biases = _plan_biases(model, src, other, cfg.bias, set(targets), saved)
    return plan


def _first(new: dict, old: dict) -> dict:
    # Pattern dicts match first-entry-wins: exact entries go in front.
    return {**new, **{k: v for k, v in old.items() if k not in new}}


def _check_keys(src: Path, expected: set[str], found: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing:
        raise AdapterFileError(f"{src}: missing {what} {missing[0]!r} ({len(missing)} missing); the config selects "
                               "modules the file has no weights for — wrong base model or edited config?")
    if unexpected:
        raise AdapterFileError(f"{src}: unexpected {what} {unexpected[0]!r} ({len(unexpected)} unexpected); the "
                               "config's target_modules do not select it in this model — wrong base model?")


def _check_like(src: Path, key: str, t: Tensor, ref: Tensor) -> Tensor:
    if tuple(t.shape) != tuple(ref.shape):
        raise AdapterFileError(f"{src}: {PREFIX}{key}: shape {tuple(t.shape)}, but the model's is "
                               f"{tuple(ref.shape)}; the adapter was trained on another base model")
    if ref.is_floating_point() != t.is_floating_point() or (not ref.is_floating_point() and t.dtype != ref.dtype):
        raise AdapterFileError(f"{src}: {PREFIX}{key}: dtype {t.dtype} does not fit the model's {ref.dtype}")
    _check_finite_as(src, key, t, ref.dtype)
    return t


def _check_finite_as(src: Path, key: str, t: Tensor, dtype: torch.dtype) -> None:
    # 1e5 is finite in the file's fp32 but inf in an fp16 model: check the values the model will compute with
    # (fp32 beside an int8 base, lorakit.quant: a cast to int8 would hide a NaN).
    dtype = dtype if dtype.is_floating_point else torch.float32
    if t.is_floating_point() and not bool(torch.isfinite(t.to(dtype)).all()):
        raise AdapterFileError(f"{src}: {PREFIX}{key}: values overflow to Inf in the model's {dtype} (largest "
                               f"magnitude {float(t.abs().max()):.3g}); the adapter does not fit this model's dtype")


def _layer_for(model: nn.Module, t: str, slices: dict[str, list[bool]], cfg: LoraConfig, src: Path) -> LoraModule:
    """Target `t`'s LoRA layer: the one there, or the wrapper inject would build (not put in the model)."""
    module = model.get_submodule(t)
    if isinstance(module, LoraModule):
        return module
    try:
        return _wrap(module, cfg.fan_in_fan_out, next((v for k, v in slices.items() if matches([k], t)), None))
    except LoraConfigError as e:
        raise AdapterFileError(f"{src}: {PREFIX}{t}: {e}") from None


def _fit(layer: LoraModule, t: str, A: Tensor, B: Tensor, emb: bool, rank: int, src: Path
         ) -> tuple[Tensor, Tensor, int]:
    """Check the file's (A, B) against target `t`'s layer; returns them in the layer's form and the layer's rank."""
    base = layer.base_layer
    if LORA_KEYS[emb] != layer.file_keys:
        raise AdapterFileError(f"{src}: {PREFIX}{t}: the file has {'embedding' if emb else 'linear'} LoRA keys but "
                               f"the model's module is {type(base).__name__}; wrong base model?")
    r = A.shape[0]
    if r != rank:
        raise AdapterFileError(f"{src}: {PREFIX}{t}: A {tuple(A.shape)}, B {tuple(B.shape)} do not fit rank {rank} "
                               "from the config (r / rank_pattern); the config and weights disagree")
    a_shape, b_shape = layer.factor_shapes(r)
    if tuple(A.shape) != a_shape or tuple(B.shape) != b_shape:
        raise AdapterFileError(f"{src}: {PREFIX}{t}: A {tuple(A.shape)}, B {tuple(B.shape)}; the model's "
                               f"{type(base).__name__} needs A {a_shape}, B {b_shape} at rank {r}")
    for key, f in zip(layer.file_keys, (A, B), strict=True):
        _check_finite_as(src, t + key, f, base.weight.dtype)
    try:
        return layer.from_dense(A, B)
    except LoraConfigError as e:
        raise AdapterFileError(f"{src}: {PREFIX}{t}: {e}") from None


def _plan_biases(model: nn.Module, src: Path, other: dict[str, Tensor], mode: str, targets: set[str],
                 saved: list[str]) -> list[tuple[nn.Parameter, Tensor]]:
    params, out, seen = _bias_params(model), [], set()
    for key, t in other.items():
        parts = key.split(".")
        in_saved = any(key.startswith(s + ".") for s in saved)
        if mode == "all" and in_saved and ("modules_to_save" in parts or "original_module" in parts):
            continue  # PEFT's bias="all" also writes the saved module's copies; its own keys were read above
        bare = _strip(key)
        owner = bare.rpartition(".")[0]
        if parts[-1] != "bias" or bare not in params or mode == "none" or (mode == "lora_only"
                                                                           and owner not in targets):
            raise AdapterFileError(f"{src}: {PREFIX}{key}: unexpected key (bias={mode!r}, modules_to_save="
                                   f"{saved}); the file does not match its config or this model")
        out.append((params[bare], _check_like(src, key, t, params[bare])))
        seen.add(bare)
    expected = {b for b in params if mode == "all" and not any(b.startswith(s + ".") for s in saved)
                or mode == "lora_only" and b.rpartition(".")[0] in targets}
    _check_keys(src, expected, seen, f"bias (bias={mode!r})")
    return out


def _install(model: nn.Module, plan: _Plan, name: str) -> None:
    """Inject and copy the checked tensors in; the active and merged state of existing adapters is kept."""
    first = not lora_configs(model)
    with all_or_nothing(model) as undo:
        inject(model, plan.config, name, active=first)  # beside others: added frozen and inactive
        with torch.no_grad():
            for t, (A, B) in plan.lora.items():
                m = model.get_submodule(t)
                m.A(name).copy_(A)
                m.B(name).copy_(B)
            for s, state in plan.saved.items():
                model.get_submodule(s).copy(name).load_state_dict(state)
            for p, value in plan.biases:
                old = p.detach().clone()
                undo.append(lambda p=p, old=old: p.data.copy_(old))
                p.copy_(value)


__all__ = ["adapter_dir", "check_adapter_name", "load_adapter", "save_adapter", "write_atomic"]
