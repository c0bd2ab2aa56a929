"""Weight-only int8 for a frozen base (serving): per-output-channel symmetric int8 weights, LoRA left as it is.

    s[o] = max_c |W[o, c]| / 127,   q[o, c] = round(W[o, c] / s[o]) ∈ [-127, 127],   so |W - q·s| ≤ s/2
    y = x·Wᵀ + b  ≈  (x·qᵀ)·s + b

The matmul runs in bf16 (the int8 weights are exact in it); the layer's input and output keep their dtype, and a
LoRA layer wrapping it keeps its fp32 factors, unmerged. A quantized layer is for inference only: it holds no
Parameters, it cannot be merged into (`merge` refuses) and no gradient flows through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import LoraStateError
from .layers import LoraModule

# Rows up to this many take torch's int8 GEMV kernel (`_weight_int8pack_mm`, the one gpt-fast uses on CPU); more
# rows run one bf16 GEMM of the int8 weights (exact in bf16). Both scale by the fp32 s after. Measured with
# benchmarks/int8_matmul.py (to be re-measured on a quiet machine): SmolLM2-135M's 211 Linear shapes in turn, weights
# out of cache as in a decode step, one thread on the shared busy 2-core machine, ms per pass, two runs:
#   rows | fp32 F.linear | bf16 F.linear | int8 kernel | int8 → bf16 GEMM
#     1  |   97-99       |   80-84       |   42-44     |  145-149
#     8  |  160-161      |   99-102      |   99-110    |  160-161
#    16  |  207-209      |  120-125      |  174-175    |  183-230
#    32  |  304-310      |  168-175      |  330-343    |  245-253
#    64  |  491-502      |  257-262      |  647-653    |  348-355
# The kernel also takes fp32 inputs but ran ~10x slower with them (727 vs 52 µs for one 576→1536 row), so inputs go
# through bf16. One 576→1536 layer (cache-resident), µs, 1 row / 32 rows: fp32 73 / 696, bf16 92 / 331, int8 kernel
# 58 / 795, int8 → bf16 GEMM 226 / 459. So int8 pays at decode with few rows (a single stream: ~2.2x less time in
# the matmuls than fp32); from ~8 rows on `--dtype bf16` with dense weights is the faster choice.
GEMV_ROWS = 16
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
        if x2.shape[0] <= GEMV_ROWS and self.in_features % 16 == 0:  # the kernel (torch 2.13) returned garbage or
            # crashed for in_features not a multiple of 16 (5, 8, 33, 40 tried)
            y = torch._weight_int8pack_mm(x2, self.weight, self._ones) * self.scale  # bf16 · fp32 -> fp32
        else:
            y = F.linear(x2, self.weight.to(torch.bfloat16)) * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(model: nn.Module, skip: tuple[str, ...] = _SKIP) -> int:
    """Swap every plain nn.Linear of `model` (also the base layer inside a LoRA wrapper) for an Int8Linear, in
    place; returns how many. Modules whose path has a part in `skip` (classification heads) stay dense.

    Serving only, before the model serves: LoRA adapters added later wrap the Int8Linear as they wrap a Linear.
    Refused (LoraStateError, nothing changed) while an adapter is merged into a layer it would quantize.
    """
    todo = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            path = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and not set(path.split(".")) & set(skip):
                if isinstance(module, LoraModule) and module.merged:
                    raise LoraStateError(f"{name}: adapters {module.merged} are merged into its weight; call "
                                         "unmerge(model) before quantizing (int8 serves LoRA unmerged)")
                todo.append((module, child_name, child))
    with torch.no_grad():
        for module, child_name, child in todo:
            setattr(module, child_name, Int8Linear.from_linear(child))
    return len(todo)
