"""LoraConfig: what to adapt and how, as plain values; validation and PEFT's JSON keys."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import LoraConfigError

BIAS_MODES = ("none", "all", "lora_only")
INITS = ("kaiming", "gaussian")


@dataclass
class LoraConfig:
    """How to adapt a model: ΔW = (alpha/r)·B·A on each target module (alpha/√r with use_rslora).

    r: rank of the update (>= 1).
    alpha: scaling numerator; the update is multiplied by alpha/r.
    dropout: dropout probability on the LoRA input path only, in [0, 1).
    targets: module-name suffixes, a regex (full match), "all-linear", or None for the
        architecture's default (the paper's Wq, Wv).
    exclude: module-name suffixes or a regex never to adapt.
    bias: "none" (all biases frozen), "all" (every bias trains), "lora_only" (biases of adapted layers).
    modules_to_save: module-name suffixes trained in full as per-adapter copies (e.g. a classifier head).
    init: "kaiming" (A Kaiming-uniform, PEFT's default) or "gaussian" (A ~ N(0, 1/r)); B = 0 always.
    use_rslora: scale by alpha/√r (rank-stabilised) instead of alpha/r.
    fan_in_fan_out: True if the target weights are stored (in, out); None = detect (GPT-2 Conv1D).
    rank_pattern / alpha_pattern: per-module overrides {name suffix or regex: value}.
    slices: fused projections adapted per output slice, {module suffix: [enable, ...]}; e.g.
        {"c_attn": [True, False, True]} adapts only the q and v thirds of GPT-2's fused qkv.
    base_model_name_or_path, task_type: carried into adapter_config.json for PEFT.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: list[str] | str | None = None
    exclude: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | tuple[str, ...] = ()
    init: str = "kaiming"
    use_rslora: bool = False
    fan_in_fan_out: bool | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    slices: dict[str, list[bool]] = field(default_factory=dict)
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        self.modules_to_save = list(self.modules_to_save or ())
        if isinstance(self.targets, tuple | set):
            self.targets = list(self.targets)
        self.validate()

    def validate(self) -> None:
        """Collect every invalid field and raise one LoraConfigError listing them all."""
        problems = []
        if not _is_int(self.r) or self.r < 1:
            problems.append(f"r={self.r!r}: expected an integer >= 1 (typical: 4, 8, 16)")
        if not _is_number(self.alpha) or self.alpha <= 0:
            problems.append(f"alpha={self.alpha!r}: expected a number > 0 (typical: 2*r)")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            problems.append(f"dropout={self.dropout!r}: expected a number in [0, 1)")
        if self.bias not in BIAS_MODES:
            problems.append(f"bias={self.bias!r}: expected one of {', '.join(BIAS_MODES)}")
        if self.init not in INITS:
            problems.append(f"init={self.init!r}: expected one of {', '.join(INITS)}")
        if not _is_spec(self.targets, allow_none=True):
            problems.append(f"targets={self.targets!r}: expected a list of names, a regex, 'all-linear' or None")
        if not _is_spec(self.exclude, allow_none=True):
            problems.append(f"exclude={self.exclude!r}: expected a list of names, a regex or None")
        if not all(isinstance(m, str) for m in self.modules_to_save):
            problems.append(f"modules_to_save={self.modules_to_save!r}: expected a list of module names")
        for key, value in dict(self.rank_pattern).items():
            if not _is_int(value) or value < 1:
                problems.append(f"rank_pattern[{key!r}]={value!r}: expected an integer >= 1")
        for key, value in dict(self.alpha_pattern).items():
            if not _is_number(value) or value <= 0:
                problems.append(f"alpha_pattern[{key!r}]={value!r}: expected a number > 0")
        for key, value in dict(self.slices).items():
            if not (isinstance(value, list | tuple) and value and all(isinstance(v, bool) for v in value)
                    and any(value)):
                problems.append(f"slices[{key!r}]={value!r}: expected a list of booleans with one True")
        if problems:
            raise LoraConfigError("invalid LoraConfig:\n  - " + "\n  - ".join(problems))

    def rank_for(self, module_name: str) -> int:
        """The rank for one module: the first matching rank_pattern entry, else r."""
        return int(_pattern_value(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float:
        """The alpha for one module: the first matching alpha_pattern entry, else alpha."""
        return float(_pattern_value(self.alpha_pattern, module_name, self.alpha))

    def scale_for(self, module_name: str) -> float:
        """α/r (or α/√r with use_rslora) for one module."""
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        return from_plain_dict(cls, data)


def from_plain_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build dataclass `cls` from a dict, refusing unknown keys by name (configs read from files)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LoraConfigError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}")
    return cls(**data)


def matches(spec: list[str] | str | None, name: str) -> bool:
    """Does module `name` match a spec: a list of suffixes, or a regex string (full match)?"""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def _pattern_value(pattern: dict[str, Any], name: str, default: Any) -> Any:
    # PEFT's rule: a key matches a module whose name ends in it (`(.*\.)?key$`, regex allowed).
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_spec(v: Any, allow_none: bool) -> bool:
    if v is None:
        return allow_none
    if isinstance(v, str):
        try:
            re.compile(v)
        except re.error:
            return False
        return True
    return isinstance(v, list) and all(isinstance(s, str) for s in v)
