"""lorakit: LoRA fine-tuning and serving — small, exact, PEFT-compatible.

    model = inject(model, LoraConfig(r=8, alpha=16))   # h = W0·x + (α/r)·B·A·x on the targets
"""


from .adapters import (
    active_adapters,
    combine,
    delete_adapter,
    disabled,
    merge,
    merge_and_unload,
    per_row_adapters,
    set_adapter,
    unmerge,
)
from .config import LoraConfig
from .decode_plan import decode_plan
from .errors import AdapterFileError, AdapterNotFound, LoraConfigError, LoraError, LoraStateError
from .injection import count_parameters, inject, lora_modules, parameter_table, select
from .io import load_adapter, save_adapter
from .rows import adapter_rows
from .train_plan import train_plan

__all__ = [
    "AdapterFileError", "AdapterNotFound", "LoraConfig", "LoraConfigError", "LoraError", "LoraStateError",
    "active_adapters", "adapter_rows", "combine", "count_parameters", "decode_plan", "delete_adapter", "disabled",
    "inject", "load_adapter", "lora_modules", "merge", "merge_and_unload", "per_row_adapters", "parameter_table",
    "save_adapter", "select", "set_adapter", "train_plan", "unmerge",
]
__version__ = "0.1.0"
