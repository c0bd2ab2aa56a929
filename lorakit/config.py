"""LoraConfig: what to adapt and how, as plain values; validation and PEFT's JSON keys."""

from __future__ import annotations

import math
import re
from dataclasses import InitVar, asdict, dataclass, field, fields
from typing import Any

from .errors import LoraConfigError

BIAS_MODES = ("none", "all", "lora_only")
INITS = ("kaiming", "gaussian")
# PEFT LoraConfig field -> lorakit's name for the same thing (the other shared fields have the same names).
PEFT_ALIASES = {"lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
                "exclude_modules": "exclude", "init_lora_weights": "init"}
_SAME_AS_PEFT = ("r", "bias", "modules_to_save", "use_rslora", "rank_pattern", "alpha_pattern",
                 "base_model_name_or_path", "task_type")
# PEFT fields that describe the run or the library, not the adapter.
_PEFT_BOOKKEEPING = ("peft_type", "peft_version", "revision", "inference_mode", "auto_mapping", "fan_in_fan_out")


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

    PEFT's spellings are accepted as arguments too: `LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
    target_modules=["query", "value"])` (also exclude_modules, init_lora_weights=True/"gaussian"). They are
    arguments only: read the values back as .alpha, .dropout, .targets. For a whole peft.LoraConfig object
    use `LoraConfig.from_peft`.
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
    lora_alpha: InitVar[float | None] = None
    lora_dropout: InitVar[float | None] = None
    target_modules: InitVar[list[str] | str | None] = None
    exclude_modules: InitVar[list[str] | str | None] = None
    init_lora_weights: InitVar[bool | str | None] = None

    def __post_init__(self, lora_alpha: float | None = None, lora_dropout: float | None = None,
                      target_modules: list[str] | str | None = None, exclude_modules: list[str] | str | None = None,
                      init_lora_weights: bool | str | None = None) -> None:
        given = {"lora_alpha": lora_alpha, "lora_dropout": lora_dropout, "target_modules": target_modules,
                 "exclude_modules": exclude_modules, "init_lora_weights": init_lora_weights}
        self._apply_peft_aliases({k: v for k, v in given.items() if v is not None})
        self.modules_to_save = list(self.modules_to_save or ())
        for name in ("targets", "exclude"):
            if isinstance(getattr(self, name), tuple | set | frozenset):  # PEFT keeps target_modules as a set
                setattr(self, name, sorted(getattr(self, name)))
        self.validate()

    def _apply_peft_aliases(self, given: dict[str, Any]) -> None:
        """Set the lorakit field of each PEFT-named argument; a lorakit field set to another value is an error."""
        defaults = {f.name: f.default for f in fields(self)}
        problems = []
        for peft_name, value in given.items():
            name = PEFT_ALIASES[peft_name]
            if name == "init":
                if value is not True and value != "gaussian":
                    problems.append(f"init_lora_weights={value!r}: lorakit supports True (= init 'kaiming') and "
                                    "'gaussian'; B always starts at 0")
                    continue
                value = "kaiming" if value is True else "gaussian"
            if getattr(self, name) != defaults[name] and getattr(self, name) != value:
                problems.append(f"{name}={getattr(self, name)!r} and {peft_name}={value!r}: the same setting given "
                                f"twice with different values; pass one of them")
            else:
                setattr(self, name, value)
        if problems:
            raise LoraConfigError("invalid LoraConfig:\n  - " + "\n  - ".join(problems))

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

    @classmethod
    def from_peft(cls, peft_config: Any) -> LoraConfig:
        """The LoraConfig for a `peft.LoraConfig` (or a dict of its keyword arguments), field by field.

        PEFT's names map to lorakit's (PEFT_ALIASES); fan_in_fan_out becomes None, since PEFT, as lorakit,
        picks the layout from the layer type. Any other PEFT option (use_dora, layers_to_transform, ...)
        set to something other than PEFT's default is refused by name: lorakit cannot honour it.
        Unlike PEFT's get_peft_model, task_type does not add the classifier head to modules_to_save: list it.
        """
        if hasattr(peft_config, "to_dict"):
            data, defaults = peft_config.to_dict(), type(peft_config)().to_dict()
        elif isinstance(peft_config, dict):
            data, defaults = dict(peft_config), {}
        else:
            raise LoraConfigError(f"from_peft: expected a peft.LoraConfig or a dict, got {type(peft_config).__name__}")
        if str(getattr(data.get("peft_type"), "value", data.get("peft_type", "LORA"))) != "LORA":
            raise LoraConfigError(f"from_peft: peft_type {data['peft_type']!r} is not LoRA; lorakit builds LoRA only")
        kwargs, refused = {}, []
        for key, value in data.items():
            value = getattr(value, "value", value)  # PEFT's str enums (task_type)
            if key in PEFT_ALIASES or key in _SAME_AS_PEFT:
                kwargs[key] = value
            elif key not in _PEFT_BOOKKEEPING and not _is_off(value, defaults.get(key)):
                refused.append(f"{key}={value!r}: a PEFT option lorakit does not implement; leave it at PEFT's "
                               f"default ({defaults.get(key)!r})")
        if refused:
            raise LoraConfigError("from_peft: unsupported PEFT LoraConfig fields:\n  - " + "\n  - ".join(refused))
        return cls(**kwargs)


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


def _is_off(value: Any, default: Any) -> bool:
    """A PEFT option left at its default (or empty: None, False, {}, [])."""
    return value == default or value is None or value is False or (isinstance(value, dict | list) and not value)


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
