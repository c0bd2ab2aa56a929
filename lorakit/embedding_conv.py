"""LoRA on embeddings and convolutions: the two layer types besides Linear, on the protocol of `layers.LoraModule`.

Neither takes per-row adapters (mixed batches are a Linear-only path): a per-row batch naming an adapter that
lives on one of these layers is refused with a clear error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import LoraConfigError
from .layers import LoraModule


class LoraEmbedding(LoraModule):
    """y = E0[x] + (α/r)·(Aᵀ[x])·Bᵀ; A: (r, num_embeddings), B: (dim, r). A starts at 0, B ~ N(0, 1)."""

    a_name, b_name = "lora_embedding_A", "lora_embedding_B"  # PEFT's names for embeddings
    file_keys = (".lora_embedding_A", ".lora_embedding_B")

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        num, dim = self.base_layer.weight.shape
        return (r, num), (dim, r)

    def _init_factors(self, A: Tensor, B: Tensor, r: int, init: str) -> None:
        with torch.no_grad():  # as loralib and PEFT: the zero factor is A here
            nn.init.zeros_(A)
            nn.init.normal_(B)

    def delta_weight(self, name: str) -> Tensor:
        return (self.B(name) @ self.A(name)).t() * self.scale[name]  # (num, dim)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self._refuse_rows() or self._use_base_only():
            return out
        e = self.base_layer
        for n in self.active:
            after_a = F.embedding(x, self.A(n).t().to(out.dtype), e.padding_idx, e.max_norm, e.norm_type,
                                  e.scale_grad_by_freq, e.sparse)  # (..., r)
            out = out + (after_a @ self.B(n).t().to(out.dtype)) * self.scale[n]
        return out


class LoraConv(LoraModule):
    """y = conv(x, W0) + (α/r)·conv₁ₓ₁(conv(drop(x), A), B); A: (r, in, *k), B: (out, r, 1, ...)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[base_layer.weight.dim() - 2]

    @classmethod
    def check_base(cls, base_layer: nn.Module) -> None:
        if base_layer.groups != 1 or base_layer.padding_mode != "zeros":
            raise LoraConfigError(f"{base_layer}: LoRA supports convolutions with groups=1 and "
                                  "padding_mode='zeros'; exclude this module from targets")

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        out, inp, *kernel = self.base_layer.weight.shape
        return (r, inp, *kernel), (out, r, *([1] * len(kernel)))

    def delta_weight(self, name: str) -> Tensor:
        A, B = self.A(name), self.B(name)
        delta = B.flatten(1) @ A.flatten(1)  # (out, in·k…)
        return delta.view(self.base_layer.weight.shape) * self.scale[name]

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self._refuse_rows() or self._use_base_only():
            return out
        c = self.base_layer
        for n in self.active:
            xd = F.dropout(x, self.dropout[n], self.training) if self.dropout[n] else x
            h = self.conv(xd, self.A(n).to(x.dtype), None, c.stride, c.padding, c.dilation)
            out = out + self.conv(h, self.B(n).to(x.dtype)) * self.scale[n]
        return out
