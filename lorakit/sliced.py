"""LoRA on a fused projection adapted per output slice (GPT-2's c_attn with q and v only), on `layers.LoraLinear`.

It runs as the Linear layer it extends (stacked A, B); only its layout in files and in `combine` differs: there it
is the dense rank-r·k adapter with a block-sparse B that it equals.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import LoraConfigError
from .layers import LoraLinear, param_key


class LoraSlicedLinear(LoraLinear):
    """A fused projection adapted per output slice (`slices=[True, False, True]`: q and v of a fused qkv).

    Each enabled slice i has its own update Bᵢ·Aᵢ; stacked, A is (r·k, in) and B is (out/n·k, r) for k enabled
    of n slices, as loralib's MergedLinear. In a file it is the dense rank-r·k adapter it equals (block B).
    """

    def __init__(self, base_layer: nn.Module, slices: list[bool], fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, fan_in_fan_out)
        if self.out_features % len(slices):
            raise LoraConfigError(f"slices={slices}: {self.out_features} output features do not split into "
                                  f"{len(slices)} equal slices; use a divisor of {self.out_features}")
        self.slices = list(slices)
        self.size = self.out_features // len(slices)  # rows per slice
        self.on = [j for j, enabled in enumerate(slices) if enabled]

    def layer_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r * len(self.on), self.in_features), (self.size * len(self.on), r)

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, self.in_features), (self.out_features, r)  # r here is the file's rank, r·k

    def combine_blocks(self, name: str) -> list[tuple[Tensor, Tensor]]:
        """Per enabled output slice, its own (Aᵢ (r, in), Bᵢ (out/n, r)): views into the stacked A and B."""
        A, B, r = self.A(name), self.B(name), self.r[name]
        return [(A[i * r:(i + 1) * r], B[i * self.size:(i + 1) * self.size]) for i in range(len(self.on))]

    def from_blocks(self, blocks: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, int]:
        return torch.cat([a for a, _ in blocks], 0), torch.cat([b for _, b in blocks], 0), blocks[0][0].shape[0]

    def dense_factors(self, name: str) -> tuple[Tensor, Tensor]:
        """(A, B) with ΔW = scale·B·A as plain (r·k, in) and (out, r·k): B is block-sparse."""
        A, r = self.A(name), self.r[name]
        full = A.new_zeros(self.out_features, A.shape[0])  # (out, r·k)
        for i, (j, (_, Bi)) in enumerate(zip(self.on, self.combine_blocks(name), strict=True)):
            full[j * self.size:(j + 1) * self.size, i * r:(i + 1) * r] = Bi
        return A, full

    def _factors_of(self, name: str) -> tuple[Tensor, Tensor] | None:
        return self.dense_factors(name) if param_key(name) in getattr(self, self.a_name) else None

    def from_dense(self, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, int]:
        # Inverse of dense_factors: keep B's diagonal blocks; everything off them must be zero.
        k = len(self.on)
        r = A.shape[0] // k
        blocks, mask = [], torch.ones_like(B, dtype=torch.bool)
        for i, j in enumerate(self.on):
            blocks.append(B[j * self.size:(j + 1) * self.size, i * r:(i + 1) * r])
            mask[j * self.size:(j + 1) * self.size, i * r:(i + 1) * r] = False
        if A.shape[0] % k or bool(B[mask].any()):
            raise LoraConfigError(f"the layer adapts output slices {self.slices} only, and this dense adapter "
                                  "does not fit them; load it into a fresh model instead")
        return A, torch.cat(blocks, 0), r
