"""linear_cross_entropy (linear_ce.py) against the dense reference F.cross_entropy(F.linear(h, W, b).float(), y,
ignore_index=-100, reduction="sum"): loss and the gradients w.r.t. h, W and b, for chunk sizes that split the
rows unevenly, ignored rows, no labels at all, no rows, only some inputs requiring grad, a non-unit incoming
gradient, bf16 autocast, and without grad mode."""

import pytest
import torch
import torch.nn.functional as F

from lorakit.train import linear_ce
from lorakit.train.linear_ce import chunk_rows, linear_cross_entropy

N, D, V = 23, 16, 50


def _inputs(bias: bool = True, ignored: str = "some", seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g)
    weight = torch.randn(V, D, generator=g) * 0.5
    b = torch.randn(V, generator=g) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    if ignored == "some":
        targets[::4] = -100
    elif ignored == "all":
        targets[:] = -100
    return hidden, weight, b, targets


def _dense(hidden, weight, bias, targets):
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=-100, reduction="sum")


def _loss_and_grads(fn, inputs, trains, scale=1.0, bf16=False):
    hidden, weight, bias, targets = (t.detach().clone() if t is not None else None for t in inputs)
    leaves = [t for t, train in zip((hidden, weight, bias), trains, strict=True) if train and t is not None]
    for t in leaves:
        t.requires_grad_(True)
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        loss = fn(hidden, weight, bias, targets)
    (loss * scale).backward()
    return loss.detach(), [t.grad for t in leaves]


def _assert_matches(inputs, chunk, trains=(True, True, True), scale=1.0, bf16=False, rtol=1e-5, atol=1e-5):
    ref_loss, ref_grads = _loss_and_grads(_dense, inputs, trains, scale, bf16)
    loss, grads = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk=chunk), inputs, trains, scale, bf16)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    assert len(grads) == len(ref_grads) > 0
    for g, ref in zip(grads, ref_grads, strict=True):
        assert g.dtype == ref.dtype and torch.isfinite(g).all()
        torch.testing.assert_close(g, ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("chunk", [1, 4, 7, N, 100])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("ignored", ["none", "some"])
def test_loss_and_gradients_equal_the_dense_cross_entropy(chunk, bias, ignored):
    _assert_matches(_inputs(bias, ignored), chunk)


@pytest.mark.parametrize("trains", [(True, False, False), (False, True, True), (True, True, False)])
def test_only_what_requires_grad_gets_a_gradient(trains):
    _assert_matches(_inputs(), chunk=6, trains=trains, scale=0.37)


def test_the_incoming_gradient_scales_every_gradient():
    _assert_matches(_inputs(), chunk=5, scale=-2.5)


def test_all_targets_ignored_give_zero_loss_and_zero_gradients():
    loss, grads = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk=4), _inputs(ignored="all"),
                                  (True, True, True))
    assert float(loss) == 0.0 and all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_no_rows_give_zero_loss():
    hidden, weight, bias, targets = _inputs()
    hidden = hidden[:0].requires_grad_(True)
    loss = linear_cross_entropy(hidden, weight, bias, targets[:0], chunk=4)
    loss.backward()
    assert float(loss.detach()) == 0.0 and hidden.grad.shape == (0, D)


def test_bf16_autocast_matches_the_dense_path_to_bf16_rounding():
    """The products run in bf16 as autocast's F.linear would, so the loss is the dense path's to fp32 rounding;
    the gradients agree to bf16 rounding: with an incoming gradient of 1, ∂L/∂h takes the same bf16 products
    (measured equal), ∂L/∂W and ∂L/∂b are summed over chunks in fp32 (dense: one bf16 product), and another
    incoming gradient scales after the bf16 rounding (dense: before)."""
    inputs = _inputs()
    ref_loss, ref_grads = _loss_and_grads(_dense, inputs, (True, True, True), bf16=True)
    assert ref_grads[0].dtype == torch.float32  # the dense reference did run in bf16 (a bf16-rounded loss):
    assert abs(float(ref_loss) - float(_dense(*inputs))) > 1e-3
    _assert_matches(inputs, chunk=6, bf16=True, rtol=1e-2, atol=1e-2)
    _assert_matches(inputs, chunk=6, scale=0.37, bf16=True, rtol=1e-2, atol=1e-2)


def test_without_grad_only_the_loss_is_computed(monkeypatch):
    hidden, weight, bias, targets = _inputs()
    hidden.requires_grad_(True)
    monkeypatch.setattr(linear_ce, "_loss_and_logit_grad", None)  # the gradient pass: must not run
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, bias, targets, chunk=5)
        ref = _dense(hidden, weight, bias, targets)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_chunk_rows_bound_a_chunks_logits():
    assert chunk_rows(49_152) == 170 and chunk_rows(49_152) * 49_152 <= linear_ce.CHUNK_VALUES
    assert chunk_rows(100) == linear_ce.CHUNK_VALUES // 100 and chunk_rows(10**9) == 1
