"""The on-disk adapter, model-free: PEFT's adapter_config.json <-> LoraConfig, and reading untrusted files.

An adapter directory holds `adapter_config.json` (PEFT's keys) and `adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_A.weight` (r, in) / `.lora_B.weight` (out, r) — embeddings
`.lora_embedding_A` / `.lora_embedding_B`, no `.weight` — plus full tensors of modules_to_save
(`base_model.model.<path>.<param>`) and, with bias "all"/"lora_only", biases. `read_adapter` checks all that
can be checked without a model and raises AdapterFileError naming the file, the key and the problem.
Nothing here unpickles: safetensors is parsed by hand (8-byte length, JSON header, raw little-endian data).
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import LoraConfig
from .errors import AdapterFileError, LoraConfigError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own bound
MAX_CONFIG_BYTES = 2**20
MAX_WEIGHTS_BYTES = 4 * 2**30  # default cap on adapter_model.safetensors, checked before reading it
MAX_NAME = 300  # characters in a module path: bounds the regex work of rank/alpha patterns on file names
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
OTHER_DTYPES = {"I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                "U8": torch.uint8, "BOOL": torch.bool}
# is_embedding -> the (A, B) key suffixes; equal to the layers' `file_keys`
LORA_KEYS = {False: (".lora_A.weight", ".lora_B.weight"), True: (".lora_embedding_A", ".lora_embedding_B")}
# file key suffix -> (factor, is_embedding)
LORA_SUFFIXES = {key: (f, emb) for emb, keys in LORA_KEYS.items() for f, key in zip("AB", keys, strict=True)}

# PEFT options lorakit does not implement, with the values that mean "off"; any other value is refused.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "use_dora": (False,), "use_qalora": (False,), "lora_bias": (False,), "ensure_weight_tying": (False,),
    "use_bdlora": (), "layers_to_transform": ([],), "layers_pattern": ([], ""), "layer_replication": ([],),
    "loftq_config": ({},), "trainable_token_indices": ([], {}), "target_parameters": ([],),
    **dict.fromkeys(["eva_config", "corda_config", "lora_ga_config", "velora_config", "monteclora_config",
                     "arrow_config", "kasa_config", "megatron_config", "alora_invocation_tokens"], ()),
}
# Fields describing the run rather than the adapter: read and not used.
IGNORED = {"peft_version", "revision", "inference_mode", "auto_mapping", "megatron_core", "qalora_group_size",
           "runtime_config"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


# PEFT key -> (LoraConfig field, type check, expected); values are then checked by LoraConfig.validate.
FIELDS: dict[str, tuple[str, Any, str]] = {
    "r": ("r", _is_int, "an integer >= 1"),
    "lora_alpha": ("alpha", _is_num, "a number > 0"),
    "lora_dropout": ("dropout", _is_num, "a number in [0, 1)"),
    "target_modules": ("targets", lambda v: isinstance(v, str) or _str_list(v), "a list of names or a regex"),
    "exclude_modules": ("exclude", lambda v: v is None or isinstance(v, str) or _str_list(v),
                        "null, a list of names or a regex"),
    "bias": ("bias", lambda v: isinstance(v, str), "'none', 'all' or 'lora_only'"),
    "use_rslora": ("use_rslora", lambda v: isinstance(v, bool), "true or false"),
    "modules_to_save": ("modules_to_save", lambda v: v is None or _str_list(v), "null or a list of names"),
    "fan_in_fan_out": ("fan_in_fan_out", lambda v: v is None or isinstance(v, bool), "true or false"),
    "init_lora_weights": ("init", lambda v: v is True or v is False or v == "gaussian", "true or 'gaussian'"),
    "rank_pattern": ("rank_pattern", lambda v: isinstance(v, dict) and all(map(_is_int, v.values())),
                     "an object {module pattern: integer rank}"),
    "alpha_pattern": ("alpha_pattern", lambda v: isinstance(v, dict) and all(map(_is_num, v.values())),
                      "an object {module pattern: number}"),
    "base_model_name_or_path": ("base_model_name_or_path", lambda v: v is None or isinstance(v, str),
                                "null or a string"),
    "task_type": ("task_type", lambda v: v is None or isinstance(v, str), "null or a string"),
}


def _regex_problem(pattern: str, wrap: bool = False) -> str | None:
    r"""Why a regex from an untrusted file could hang (or not compile); None if it is safe to run.

    wrap: the pattern is a rank/alpha_pattern key, run as PEFT does inside `(.*\.)?(key)$`.
    """
    if len(pattern) > 1000:
        return f"regex of {len(pattern)} characters; at most 1000 are accepted"
    if pattern.count("(") > 32:
        return "regex with more than 32 groups; write a simpler pattern or list the module names"
    try:
        re.compile(rf"(.*\.)?({pattern})$" if wrap else pattern)
    except (re.error, RecursionError, OverflowError) as e:
        return f"invalid regex ({e})"
    # Python's re has no timeout: refuse the shapes that backtrack exponentially ((a+)+, (a|a)*) or as n^4.
    if re.search(r"(?<!\\)\)[*+{]", pattern):
        return "regex repeats a group, e.g. (...)+; such patterns can backtrack for ever, write it without"
    if len(re.findall(r"(?<!\\)[*+]|\{\d*,\}", pattern)) > 3:
        return "regex has more than 3 unbounded repeats (* or +); such patterns can backtrack for ever"
    return None


def from_peft_dict(data: Any, source: str | Path = CONFIG_NAME) -> LoraConfig:
    """PEFT's adapter_config.json contents -> LoraConfig; every refusal is an AdapterFileError naming the field.

    PEFT options lorakit lacks (use_dora, layer_replication, loftq ...) are refused unless set to their "off"
    value; unknown fields are tolerated only when empty (null/false/{}/[]) — never silently ignored.
    """
    def fail(key: str, problem: str) -> AdapterFileError:
        return AdapterFileError(f"{source}: field {key!r}: {problem}")

    if not isinstance(data, dict):
        raise AdapterFileError(f"{source}: expected a JSON object of PEFT config fields, got {type(data).__name__}")
    if data.get("peft_type") != "LORA":
        raise fail("peft_type", f"{data.get('peft_type')!r} is not supported; lorakit reads peft_type 'LORA' only")
    if data.get("target_modules") is None:
        raise fail("target_modules", "null; expected the list of adapted module names (PEFT writes it on save)")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in FIELDS:
            name, ok, expected = FIELDS[key]
            if not ok(value):
                raise fail(key, f"{value!r} is not {expected}")
            kwargs[name] = value
        elif key in UNSUPPORTED:
            if value is not None and value is not False and value not in UNSUPPORTED[key]:
                raise fail(key, f"{value!r}: this PEFT option is not supported by lorakit yet; only adapters "
                                "without it can be loaded (or merge it with PEFT and load the merged model)")
        elif key not in IGNORED and key != "peft_type":
            if not (value is None or value is False or (isinstance(value, dict | list | str) and not value)):
                raise fail(key, f"{value!r}: unknown PEFT field with a non-default value; lorakit cannot honour it")
    for key in ("target_modules", "exclude_modules"):
        if isinstance(data.get(key), str) and (problem := _regex_problem(data[key])):
            raise fail(key, problem)
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in data.get(key) or {}:
            if problem := _regex_problem(pattern, wrap=True):
                raise fail(f"{key}[{pattern!r}]", problem)
    kwargs["init"] = "gaussian" if kwargs.get("init") == "gaussian" else "kaiming"  # init is moot: weights load
    kwargs["fan_in_fan_out"] = None  # PEFT, too, picks the layout from the layer type (Conv1D: (in, out))
    kwargs["modules_to_save"] = list(dict.fromkeys(kwargs.get("modules_to_save") or ()))
    try:
        return LoraConfig(**kwargs)
    except LoraConfigError as e:  # PEFT's field names: "alpha=-1: ..." -> "field 'lora_alpha': -1: ..."
        peft_key = {name: key for key, (name, _, _) in FIELDS.items()}
        lines = [re.sub(r"^(\s*- )?(\w+)(\[[^\]]*\])?=", lambda m: f"{m[1] or ''}field '{peft_key.get(m[2], m[2])}"
                        f"{m[3] or ''}': ", line) for line in str(e).splitlines()]
        raise AdapterFileError(f"{source}: " + "\n".join(lines)) from None


def to_peft_dict(config: LoraConfig, target_modules: list[str] | str, ranks: dict[str, int],
                 scales: dict[str, float], fan_in_fan_out: bool, base_model: str | None) -> dict[str, Any]:
    """LoraConfig -> the adapter_config.json PEFT writes, for an adapter with these per-module ranks and scales.

    PEFT computes each module's scale as alpha/r (alpha/√r with rsLoRA) from rank_pattern / alpha_pattern;
    where that differs from the layer's own (fused per-slice layers, combined adapters), an exact entry for
    the module is put first in the pattern, so PEFT's scale equals ours.
    """
    root = math.sqrt if config.use_rslora else float
    rank_pattern: dict[str, Any] = {}
    alpha_pattern: dict[str, Any] = {}
    for path, r in ranks.items():
        if config.rank_for(path) != r:
            rank_pattern[path] = r
        if not math.isclose(config.alpha_for(path) / root(r), scales[path], rel_tol=1e-12):
            alpha = scales[path] * root(r)
            alpha_pattern[path] = round(alpha) if math.isclose(alpha, round(alpha), rel_tol=1e-12) else alpha
    off = {k: (v[0] if v and v[0] in (False, {}) else None) for k, v in UNSUPPORTED.items()}  # PEFT's defaults
    return {
        **off,
        "peft_type": "LORA", "task_type": config.task_type, "base_model_name_or_path": base_model,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "target_modules": target_modules,
        "exclude_modules": config.exclude, "bias": config.bias, "use_rslora": config.use_rslora,
        "modules_to_save": list(config.modules_to_save) or None, "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "rank_pattern": {**rank_pattern, **config.rank_pattern}, "alpha_pattern": {**alpha_pattern,
                                                                                 **config.alpha_pattern},
        "inference_mode": True, "revision": None,
    }


def parse_safetensors(data: bytes | bytearray, source: str | Path) -> dict[str, Tensor]:
    """Decode a safetensors file from bytes, checking every header field before reading any tensor."""
    def fail(key: str, problem: str) -> AdapterFileError:
        return AdapterFileError(f"{source}: {key}: {problem}")

    if len(data) < 8:
        raise fail("header", f"file is {len(data)} bytes; a safetensors file starts with an 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > min(MAX_HEADER_BYTES, len(data) - 8):
        raise fail("header", f"header length {n} exceeds the file ({len(data)} bytes) or {MAX_HEADER_BYTES}; "
                             "the file is truncated or not safetensors")
    try:
        header = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise fail("header", f"not valid JSON ({str(e)[:100]}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise fail("header", "expected a JSON object of tensors")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise fail("__metadata__", "expected an object of strings")
    body, spans, tensors = 8 + n, [], {}
    for key, info in header.items():
        if not (isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"}):
            raise fail(key, "expected {dtype, shape, data_offsets}")
        dtype = FLOAT_DTYPES.get(info["dtype"]) or OTHER_DTYPES.get(info["dtype"])
        shape, offsets = info["shape"], info["data_offsets"]
        if dtype is None:
            raise fail(key, f"dtype {info['dtype']!r} not allowed; expected one of "
                            f"{sorted(FLOAT_DTYPES) + sorted(OTHER_DTYPES)}")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(_is_int(d) and 0 <= d < 2**40 for d in shape)):
            raise fail(key, f"shape {shape!r} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= len(data) - body):
            raise fail(key, f"data_offsets {offsets!r} fall outside the {len(data) - body}-byte data section")
        numel = math.prod(shape)
        if offsets[1] - offsets[0] != numel * dtype.itemsize:
            raise fail(key, f"{offsets[1] - offsets[0]} bytes for shape {shape} of {info['dtype']}; "
                            f"expected {numel * dtype.itemsize}")
        spans.append((offsets[0], offsets[1], key))
        tensors[key] = (dtype, shape, offsets[0])
    end = 0
    for start, stop, key in sorted(spans):
        if start != end:
            raise fail(key, f"data starts at byte {start}, expected {end} (tensors overlap or leave a gap)")
        end = stop
    if end != len(data) - body:
        raise fail("data", f"{len(data) - body - end} trailing bytes after the last tensor; the file is corrupt")
    return {k: _decode(data, body + start, dtype, shape) for k, (dtype, shape, start) in tensors.items()}


def _decode(data: bytes | bytearray, start: int, dtype: torch.dtype, shape: list[int]) -> Tensor:
    numel = math.prod(shape)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    raw = bytearray(data[start:start + numel * dtype.itemsize])  # a writable, aligned copy
    t = torch.frombuffer(raw, dtype=dtype).reshape(shape)
    return t.byteswap() if sys.byteorder == "big" else t  # pragma: no cover - big-endian hosts


@dataclass
class AdapterFile:
    """A validated adapter directory: its config, the raw PEFT dict, and its tensors by module path."""

    path: Path
    config: LoraConfig
    peft: dict[str, Any]
    lora: dict[str, tuple[Tensor, Tensor, bool]]  # module path -> (A, B, is_embedding)
    other: dict[str, Tensor]  # modules_to_save and bias tensors, by key without PREFIX
    size: int  # bytes of the weights file


def read_adapter(path: str | Path, max_bytes: int = MAX_WEIGHTS_BYTES) -> AdapterFile:
    """Read and validate an adapter directory without a model (no pickle, ever).

    The weights file is refused before it is read if it is over `max_bytes`; files that are symlinks to
    somewhere outside the directory are refused.
    """
    path = Path(path)
    cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not path.is_dir():
        raise AdapterFileError(f"{path}: not a directory; expected a folder with {CONFIG_NAME} and {WEIGHTS_NAME}")
    root = path.resolve()
    for f in (cfg_file, weights):
        if f.is_symlink() and not f.resolve().is_relative_to(root):
            raise AdapterFileError(f"{f}: a symlink to {f.resolve()}, outside the adapter directory; refusing it — "
                                   "copy the file into the directory")
    if not weights.is_file():
        if (path / "adapter_model.bin").exists():
            raise AdapterFileError(
                f"{path / 'adapter_model.bin'}: pickle (.bin) adapters are refused, since unpickling runs code. "
                "Convert it offline, on a machine you trust, with: python -c \"import torch, safetensors.torch as s; "
                "s.save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors')\"")
        raise AdapterFileError(f"{weights}: missing; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    if not cfg_file.is_file() or cfg_file.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterFileError(f"{cfg_file}: missing or larger than {MAX_CONFIG_BYTES} bytes; expected PEFT's "
                               "adapter_config.json next to the weights")
    try:
        raw = json.loads(cfg_file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise AdapterFileError(f"{cfg_file}: not valid JSON ({str(e)[:100]})") from None
    config = from_peft_dict(raw, cfg_file)
    size = weights.stat().st_size
    if size > max_bytes:
        raise AdapterFileError(f"{weights}: {size:,} bytes, over the {max_bytes:,}-byte cap; an adapter is usually a "
                               "few MB — pass max_bytes=... to load a larger one you trust")
    with open(weights, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise AdapterFileError(f"{weights}: grew past the {max_bytes:,}-byte cap while being read; refusing it")
    tensors = parse_safetensors(data, weights)
    lora, other = _split_keys(tensors, weights)
    return AdapterFile(path, config, raw, lora, other, len(data))


def _split_keys(tensors: dict[str, Tensor], source: Path
                ) -> tuple[dict[str, tuple[Tensor, Tensor, bool]], dict[str, Tensor]]:
    """Group keys into LoRA pairs per module and the rest; check pairing, dtypes and finiteness."""
    factors: dict[str, dict[str, Tensor]] = {}
    kinds: dict[str, bool] = {}
    other: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFileError(f"{source}: {key}: unexpected key; every key starts with {PREFIX!r} (PEFT layout)")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AdapterFileError(f"{source}: {key}: holds NaN or Inf values; the adapter is corrupt or diverged")
        name = key[len(PREFIX):]
        if len(name) > MAX_NAME:
            raise AdapterFileError(f"{source}: {key[:80]}...: a {len(name)}-character module path; at most "
                                   f"{MAX_NAME} are accepted")
        suffix = next((s for s in LORA_SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            if re.search(r"(^|\.)lora_", name):
                raise AdapterFileError(f"{source}: {key}: unexpected LoRA key (DoRA magnitude, lora_bias or an "
                                       "adapter name in the key?); lorakit reads lora_A/lora_B only")
            other[name] = t
            continue
        module, (factor, emb) = name[: -len(suffix)], LORA_SUFFIXES[suffix]
        if not t.is_floating_point():
            raise AdapterFileError(f"{source}: {key}: dtype {t.dtype}; LoRA factors are floating point")
        if kinds.setdefault(module, emb) != emb:
            raise AdapterFileError(f"{source}: {key}: mixes embedding and linear LoRA keys for one module")
        factors.setdefault(module, {})[factor] = t
    lora = {}
    for module, ab in factors.items():
        for f in "AB":
            if f not in ab:
                suffix = next(s for s, v in LORA_SUFFIXES.items() if v == (f, kinds[module]))
                raise AdapterFileError(f"{source}: {PREFIX}{module}{suffix}: missing (its pair is present)")
        # The rank is checked against the config (a regex lookup) only for module names the model vouches for.
        A, B = ab["A"], ab["B"]
        if (A.dim() < 2 or B.dim() != A.dim() or A.shape[0] != B.shape[1] or A.shape[0] == 0
                or any(d != 1 for d in B.shape[2:]) or (kinds[module] and A.dim() != 2)):
            raise AdapterFileError(f"{source}: {PREFIX}{module}: A {tuple(A.shape)} and B {tuple(B.shape)} do not "
                                   "pair up; expected A (r, in, ...) and B (out, r, 1, ...) with r >= 1")
        lora[module] = (A, B, kinds[module])
    return lora, other
