"""Which adapters exist (directories under ADAPTERS_DIR, plus ones registered at run time), where their files
are, and which are loaded (an LRU the engine thread owns).

An adapter's name is its directory name. `ADAPTERS_DIR/NAME` holds `adapter_config.json` +
`adapter_model.safetensors`, or is a `lorakit train` run directory (`NAME/adapter/` + `NAME/task.json`, whose
label list names the classes of a classification head). Paths never leave ADAPTERS_DIR (symlinks resolved)
unless the server was started with `allow_outside=True`.

Loading is split so one slow file never stalls the others: `plan_adapter` reads and validates the file on a
loader thread (holding the structure lock only to read the model's module layout), and the engine installs
the checked tensors between two steps (`install`). Nothing here runs during a forward.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lorakit.adapter_file import CONFIG_NAME, read_adapter
from lorakit.adapters import delete_adapter
from lorakit.errors import AdapterFileError
from lorakit.injection import _is_linear, lora_modules
from lorakit.io import _install, _Plan, _plan, check_adapter_name
from lorakit.layers import LoraModule

from .schemas import ServeError, model_not_found


@dataclass
class Planned:
    """A validated adapter, ready to install: the checked tensors, its file, and its class labels if any."""

    name: str
    path: Path
    plan: _Plan
    labels: list[str] | None


def check_name(name: str) -> str:
    """The name if safe as a directory name, else a 400 naming the rule."""
    try:
        return check_adapter_name(name)
    except AdapterFileError as e:
        raise ServeError(400, str(e), param="model", code="invalid_adapter_name") from None


def adapter_files(path: Path) -> Path:
    """The directory holding adapter_config.json: `path` itself or a run directory's `path/adapter`."""
    return path / "adapter" if not (path / CONFIG_NAME).is_file() and (path / "adapter" / CONFIG_NAME).is_file() \
        else path


class AdapterRegistry:
    """Names → paths (safe), and the loaded set in LRU order (touched by the engine thread only)."""

    def __init__(self, root: str | Path, max_loaded: int = 64, allow_outside: bool = False) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise AdapterFileError(f"adapters directory {root}: not a directory; pass --adapters DIR holding one "
                                   "sub-directory per adapter")
        self.max_loaded, self.allow_outside = max_loaded, allow_outside
        self.extra: dict[str, Path] = {}  # registered with /v1/load_lora_adapter
        self.loaded: OrderedDict[str, int] = OrderedDict()  # name -> version (a new one per install), LRU first
        self.labels: dict[str, list[str] | None] = {}
        self.heads: dict[str, bool] = {}  # name -> its file saves full modules (a classification head)
        self.bytes: dict[str, int] = {}  # name -> bytes of its tensors in the model
        self.lock = threading.Lock()  # guards extra/loaded for readers on the API threads
        self._version = 0

    # -- names and paths -----------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every adapter that can be served: directories under the root that hold an adapter, and extras."""
        found = [p.name for p in sorted(self.root.iterdir())
                 if p.is_dir() and (adapter_files(p) / CONFIG_NAME).is_file() and self._inside(p)]
        with self.lock:
            return sorted(set(found) | set(self.extra))

    def _inside(self, path: Path) -> bool:
        return self.allow_outside or path.resolve().is_relative_to(self.root)

    def path_of(self, name: str) -> Path:
        """Where adapter `name` lives; 400 for an unsafe name or a symlink out of the root, 404 if absent."""
        check_name(name)
        with self.lock:
            if name in self.extra:
                return self.extra[name]
        path = self.root / name
        if path.is_symlink() or path.exists():
            if not self._inside(path):
                raise ServeError(400, f"adapter {name!r} resolves to {path.resolve()}, outside the adapters "
                                      f"directory {self.root}; start the server with --allow-outside-paths to "
                                      "serve it", param="model", code="path_not_allowed")
            if (adapter_files(path) / CONFIG_NAME).is_file():
                return adapter_files(path)
        raise model_not_found(name)

    def check_load_path(self, name: str, path: str) -> Path:
        """A run-time load's path: an existing directory, inside the root unless allowed."""
        p = Path(path) if Path(path).is_absolute() else self.root / path
        if not self._inside(p):
            raise ServeError(400, f"lora_path {path!r} is outside the adapters directory {self.root}; copy the "
                                  "adapter there, or start the server with --allow-outside-paths",
                             param="lora_path", code="path_not_allowed")
        if not (adapter_files(p) / CONFIG_NAME).is_file():
            raise ServeError(400, f"lora_path {path!r}: no {CONFIG_NAME} there; expected a PEFT-format adapter "
                                  "directory", param="lora_path")
        return adapter_files(p).resolve()

    def register(self, name: str, path: Path) -> None:
        with self.lock:
            self.extra[name] = path

    def forget(self, name: str) -> bool:
        with self.lock:
            return self.extra.pop(name, None) is not None

    def is_loaded(self, name: str) -> bool:
        with self.lock:
            return name in self.loaded

    # -- load, install, evict ------------------------------------------------------------------------
    def plan(self, model: nn.Module, name: str, path: Path, structure_lock: threading.Lock) -> Planned:
        """Read and validate the files (no lock held), then check them against the model's modules."""
        adapter = read_adapter(path)
        with structure_lock:
            plan = _plan(model, adapter)
            bad = [t for t in plan.lora if not _is_linear(_base(model.get_submodule(t)))]
        if plan.biases:
            raise AdapterFileError(f"{path}: the adapter trains biases (bias={plan.config.bias!r}), which change the "
                                   "shared base for every request; serve adapters saved with bias='none'")
        if bad:
            raise AdapterFileError(f"{path}: target {bad[0]!r} is not a Linear layer; mixed batches serve LoRA on "
                                   "Linear layers only (embeddings and convolutions cannot vary per row)")
        return Planned(name, path, plan, _labels(path))

    def install(self, model: nn.Module, planned: Planned) -> None:
        """Install a planned adapter (engine thread, between steps, under the structure lock)."""
        _install(model, planned.plan, planned.name)
        self._version += 1
        with self.lock:
            self.loaded[planned.name] = self._version
        self.labels[planned.name] = planned.labels
        self.heads[planned.name] = bool(planned.plan.saved)
        self.bytes[planned.name] = adapter_bytes(model, planned.name)

    def touch(self, name: str) -> None:
        with self.lock:
            self.loaded.move_to_end(name)

    def unload(self, model: nn.Module, name: str) -> int:
        """Delete the adapter's tensors from the model; returns the bytes freed."""
        freed = adapter_bytes(model, name)
        delete_adapter(model, name)
        with self.lock:
            self.loaded.pop(name, None)
        self.bytes.pop(name, None)
        self.heads.pop(name, None)
        return freed

    def evictable(self, in_use: set[str]) -> list[str]:
        """Loaded adapters beyond max_loaded, least recently used first, skipping those in use."""
        with self.lock:
            over = len(self.loaded) - self.max_loaded
            return [n for n in self.loaded if n not in in_use][:max(over, 0)]


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraModule) else module


def adapter_bytes(model: nn.Module, name: str) -> int:
    """Bytes held by adapter `name`'s tensors (A, B, saved module copies)."""
    total = 0
    for _, m in lora_modules(model):
        if name in m.adapter_names:
            total += sum(p.numel() * p.element_size() for p in m.adapter_params(name))
    return total


def _labels(path: Path) -> list[str] | None:
    """Class labels from a run directory's task.json (RUN/adapter -> RUN/task.json), if there is one."""
    info = path.parent / "task.json"
    if path.name == "adapter" and info.is_file():
        try:
            labels = json.loads(info.read_text(encoding="utf-8")).get("labels")
        except (OSError, ValueError):
            return None
        return [str(x) for x in labels] if isinstance(labels, list) else None
    return None
