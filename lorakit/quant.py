"""Weight-only int8 and int4 for a frozen base (serving), LoRA left as it is.

int8, per output channel, symmetric:

    s[o] = max_c |W[o, c]| / 127,   q[o, c] = round(W[o, c] / s[o]) ∈ [-127, 127],   so |W - q·s| ≤ s/2
    y = x·Wᵀ + b  ≈  (x·qᵀ)·s + b

int4, per group of 32 inputs of one output channel, asymmetric (min/max; the layout of GGUF's Q4_1):

    d = (max - min) / 15,   z = min + 8·d,   q = round((W - z) / d) + 8 ∈ [0, 15],   W ≈ (q - 8)·d + z

SmolLM2's GGUF file stores every block Linear as Q4_1 (blocks of 32 along the input, w = d·q + m), so int4 finds
those 4-bit values again: the only loss against the converted fp32 model is d and z rounded to bf16 (torch's
kernel takes them so). Its LM head (the tied Q8_0 embedding) stays int8 under `weights="int4"`.

The matmuls run in bf16 (the integer weights are exact in it); the layer's input and output keep their dtype, and a
LoRA layer wrapping it keeps its fp32 factors, unmerged. A quantized layer is for inference only: it holds no
Parameters, it cannot be merged into (`merge` refuses) and no gradient flows through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import LoraConfigError, LoraStateError
from .layers import LoraModule

# int8 runs torch's int8 kernel (`_weight_int8pack_mm`, the one gpt-fast uses on CPU) at every row count, with
# inputs in bf16 (its fp32-input path ran ~10x slower: 727 vs 52 µs for one 576→1536 row), and scales by the fp32 s
# after. An earlier measurement on a busy machine (1 thread) had a bf16 GEMM of the int8 weights winning from 17 rows
# on; quiet, with 2 threads (benchmarks/quant_matmul.py 2, 2026-12-01, SmolLM2's 211 Linear shapes in turn, out of
# cache, ms per pass) the kernel wins at every size measured:
#   rows | fp32 F.linear | bf16 F.linear | int8 kernel | int8 → bf16 GEMM | int4 layer (LM head int8)
#     1  |     19.6      |     20.2      |    12.8     |       44.5       |    10.9
#     8  |     44.1      |     70.9      |    31.0     |      110.0       |    25.4
#    16  |     47.2      |    108.9      |    53.1     |      143.2       |    44.2
#    32  |     55.6      |    180.1      |    91.2     |      221.0       |   115.3
#    64  |     90.2      |    325.8      |   168.4     |      388.2       |   194.3
# So int8 and int4 pay for decoding with few rows (a single stream: 1.8x less time in the matmuls than fp32); from
# ~16 rows dense fp32 is the faster choice, which is why quantized weights are opt-in.
_SKIP = ("classifier", "score", "qa_outputs")  # heads adapters replace (modules_to_save): kept dense


def int8_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """(q, s): q (out, in) int8 and s (out,) fp32 with |w - q·s[:, None]| ≤ s/2 elementwise."""
    w = w.detach().float()
    s = w.abs().amax(1).clamp(min=torch.finfo(torch.float32).tiny) / 127  # an all-zero row keeps s > 0
    return torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8), s


class Int8Linear(nn.Module):
    """An nn.Linear with int8 weights: y = (x·qᵀ)·s + b, computed in bf16, returned in x's dtype.

    `weight` (out, in) int8 and `scale` (out,) fp32 are buffers; `bias` stays in its dtype.
    """

    def __init__(self, weight: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("_ones", torch.ones(weight.shape[0], dtype=torch.bfloat16), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> Int8Linear:
        return cls(*int8_weight(layer.weight), layer.bias)

    def dequantize(self) -> Tensor:
        """q·s as (out, in), fp32."""
        return self.weight.float() * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (N, in)
        # Both paths compute x·qᵀ (q is exact in bf16, the sums in fp32, rounded once to bf16), then ·s in fp32:
        # the kernel's own scale argument would round s to bf16, so it gets ones.
        if self.in_features % 16 == 0:  # the kernel (torch 2.13) returned garbage or crashed for in_features not a
            # multiple of 16 (5, 8, 33, 40 tried)
            y = torch._weight_int8pack_mm(x2, self.weight, self._ones) * self.scale  # bf16 · fp32 -> fp32
        else:
            y = F.linear(x2, self.weight.to(torch.bfloat16)) * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def _linears(model: nn.Module, skip: tuple[str, ...]) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) for every plain nn.Linear outside `skip`; refused (LoraStateError) while an
    adapter is merged into one of them."""
    todo = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            path = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and not set(path.split(".")) & set(skip):
                if isinstance(module, LoraModule) and module.merged:
                    raise LoraStateError(f"{name}: adapters {module.merged} are merged into its weight; call "
                                         "unmerge(model) before quantizing (quantized bases serve LoRA unmerged)")
                todo.append((module, child_name, child))
    return todo


def quantize_int8(model: nn.Module, skip: tuple[str, ...] = _SKIP) -> int:
    """Swap every plain nn.Linear of `model` (also the base layer inside a LoRA wrapper) for an Int8Linear, in
    place; returns how many. Modules whose path has a part in `skip` (classification heads) stay dense.

    Serving only, before the model serves: LoRA adapters added later wrap the Int8Linear as they wrap a Linear.
    Refused (LoraStateError, nothing changed) while an adapter is merged into a layer it would quantize.
    """
    todo = _linears(model, skip)
    with torch.no_grad():
        for module, child_name, child in todo:
            setattr(module, child_name, Int8Linear.from_linear(child))
    return len(todo)


# -- int4 ------------------------------------------------------------------------------------------------------
GROUP = 32  # inputs per (d, z) pair: Q4_1's block size
# One kernel at every row count (the table above, int4 column): no dequantized fallback beats it.


def int4_weight(w: Tensor, group: int = GROUP) -> tuple[Tensor, Tensor]:
    """(q, dz): q (out, in) int32 in [0, 15] and dz (in/group, out, 2) bf16 holding (d, z) per group, so that
    w ≈ (q - 8)·d + z, q computed against the bf16 d and z: |w - (q - 8)·d - z| ≤ d/2 + |Δz| + 15·|Δd|, where Δ is
    what rounding (max - min)/15 and min + 8·d to bf16 changed (2⁻⁹ of each, relative)."""
    out_f, in_f = w.shape
    g = w.detach().float().view(out_f, in_f // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    d = ((hi - lo) / 15).clamp(min=torch.finfo(torch.bfloat16).tiny).to(torch.bfloat16)  # a constant group: d > 0
    z = (lo + 8 * d.float()).to(torch.bfloat16)
    q = torch.round((g - z.float()[..., None]) / d.float()[..., None]) + 8
    q = q.clamp_(0, 15).to(torch.int32).view(out_f, in_f)
    return q, torch.stack([d, z], -1).transpose(0, 1).contiguous()


class Int4Linear(nn.Module):
    """An nn.Linear with int4 weights in groups of 32 inputs: y = x·((q - 8)·d + z)ᵀ + b, computed in bf16 by
    torch's CPU kernel (`_weight_int4pack_mm_for_cpu`), returned in x's dtype.

    `weight` is the kernel's packed layout (uint8, two values a byte), `dz` the (d, z) pairs; `bias` keeps its
    dtype. Needs in_features divisible by 32 and out_features by 16 (`quantize_int4` keeps others int8).
    """

    def __init__(self, q: Tensor, dz: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight", torch._convert_weight_to_int4pack_for_cpu(q, 2))
        self.register_buffer("dz", dz)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> Int4Linear:
        return cls(*int4_weight(layer.weight), layer.bias)

    @staticmethod
    def fits(layer: nn.Linear) -> bool:
        """The kernel's shapes: whole groups of inputs, outputs in multiples of 16."""
        return layer.in_features % GROUP == 0 and layer.out_features % 16 == 0

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()  # the kernel refuses strided input
        y = torch._weight_int4pack_mm_for_cpu(x2, self.weight, GROUP, self.dz)
        if self.bias is not None:
            y = y.float() + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {GROUP}"


def quantize_int4(model: nn.Module, skip: tuple[str, ...] = _SKIP) -> int:
    """Like `quantize_int8`, with Int4Linear layers; the output head (`get_output_embeddings`) and any Linear the
    int4 kernel cannot take (`Int4Linear.fits`) become Int8Linear. Returns how many layers went int4."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    todo = _linears(model, skip)
    devices = {str(child.weight.device) for _, _, child in todo} - {"cpu"}
    if devices:
        raise LoraConfigError(f"weights='int4': Linear layers on {sorted(devices)}; the int4 kernel here is torch's "
                              "CPU one (_weight_int4pack_mm_for_cpu). Move the model to the CPU first, or use int8")
    n = 0
    with torch.no_grad():
        for module, child_name, child in todo:
            four = child is not head and Int4Linear.fits(child)
            setattr(module, child_name, (Int4Linear if four else Int8Linear).from_linear(child))
            n += four
    return n


WEIGHTS = ("dense", "int8", "int4")
QUANTIZED = (Int8Linear, Int4Linear)  # the base-layer types LoRA wraps like an nn.Linear


def check_weights(weights: str) -> None:
    """Refuse (LoraConfigError) a `--weights` choice not in WEIGHTS: callers check before loading a model."""
    if weights not in WEIGHTS:
        raise LoraConfigError(f"weights={weights!r} (--weights): expected one of {', '.join(WEIGHTS)}")


def quantize(model: nn.Module, weights: str) -> None:
    """Apply a `--weights` choice (WEIGHTS) to a model about to serve; "dense" leaves it as it is."""
    check_weights(weights)
    if weights == "int8":
        quantize_int8(model)
    elif weights == "int4":
        quantize_int4(model)
