"""LoRA on embeddings and convolutions against the dense formula E0/W0 + s·(B·A), fp32 and bf16."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit import LoraConfigError
from lorakit.embedding_conv import LoraConv, LoraEmbedding
from tests.test_layers import TOL, _random_factors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_equals_dense_formula(dtype):
    torch.manual_seed(0)
    layer = LoraEmbedding(nn.Embedding(20, 6, padding_idx=0).to(dtype))
    layer.add_adapter("default", r=2, alpha=4, dropout=0.0, init="kaiming")
    layer.active = ["default"]
    assert torch.all(layer.A("default") == 0)  # PEFT/loralib: the zero factor of an embedding is A
    _random_factors(layer)
    ids = torch.tensor([[0, 3, 19], [5, 5, 1]])
    W = layer.base_layer.weight.float() + 2.0 * (layer.B("default").float() @ layer.A("default").float()).t()
    torch.testing.assert_close(layer(ids).float(), F.embedding(ids, W), **TOL[dtype])


@pytest.mark.parametrize("conv, shape", [(nn.Conv1d(3, 5, 3, padding=1), (2, 3, 9)),
                                         (nn.Conv2d(3, 5, (3, 2), stride=2, padding=1), (2, 3, 8, 7))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_equals_dense_formula(conv, shape, dtype):
    torch.manual_seed(0)
    conv = copy.deepcopy(conv).to(dtype)
    layer = LoraConv(conv.requires_grad_(False)).eval()
    layer.add_adapter("default", r=2, alpha=2, dropout=0.0, init="gaussian")
    layer.active = ["default"]
    _random_factors(layer)
    x = torch.randn(*shape)
    A, B = layer.A("default").float(), layer.B("default").float()
    delta = (B.flatten(1) @ A.flatten(1)).view(conv.weight.shape)
    fn = F.conv1d if isinstance(conv, nn.Conv1d) else F.conv2d
    ref = fn(x, conv.weight.float() + delta, conv.bias.float(), conv.stride, conv.padding, conv.dilation)
    torch.testing.assert_close(layer(x.to(dtype)).float(), ref, **TOL[dtype])
    layer.merge()
    torch.testing.assert_close(layer(x.to(dtype)).float(), ref, **TOL[dtype])


def test_grouped_conv_is_refused_with_advice():
    with pytest.raises(LoraConfigError, match="groups=1"):
        LoraConv(nn.Conv2d(4, 4, 3, groups=2))
