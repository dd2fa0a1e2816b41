"""The networks' weight layout (sp_cam.runtime.weight_layout / place_model): channels_last on the CPU changes the order
of floating-point sums, never the maths, and every stage's model comes back in it."""

from __future__ import annotations

import copy

import torch
from torch import nn

from net.cls_losses import classifier_loss
from net.deeplab import build_deeplab
from net.spixel_fcn import SpixelNet
from sp_cam.runtime import place_model, weight_layout
from tests.test_classifiers import _batch, build

SIZE = 64


def _conv_weights(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.ndim == 4]


def test_cpu_layout_is_channels_last_and_other_devices_keep_the_default() -> None:
    assert weight_layout("cpu") is torch.channels_last
    assert weight_layout(torch.device("cpu")) is torch.channels_last
    assert weight_layout("cuda") is torch.contiguous_format
    assert weight_layout(torch.device("cuda", 1)) is torch.contiguous_format


def test_place_model_converts_every_conv_weight_in_place() -> None:
    model = build("spcam")
    assert not any(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(model) if w.shape[-1] > 1)
    assert place_model(model, "cpu") is model
    weights = _conv_weights(model)
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    place_model(model, "cpu", torch.contiguous_format)  # an explicit layout wins over the device's
    assert all(w.is_contiguous() for w in _conv_weights(model))


def _step(model: nn.Module, fcn: nn.Module, x, labels, sal):
    with torch.no_grad():
        psam = fcn(x)
    logits = model(x, psam)
    loss, _, _ = classifier_loss(logits, labels, sal, psam, 0.5, 0.4)
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_sp_cam_step_in_channels_last_equals_the_default_layout() -> None:
    """Forward (FCN PSAM, SP-CAM logits) and every gradient agree to float rounding: a view or reshape that read the
    channels_last memory in the wrong order would change them by far more."""
    torch.manual_seed(0)
    model, fcn = build("spcam").train(), SpixelNet().eval()
    x, labels, _ = _batch(2, SIZE)
    sal = torch.rand(2, 1, SIZE, SIZE)
    logits, grads = _step(model, fcn, x, labels, sal)
    model_cl, fcn_cl = copy.deepcopy(model), copy.deepcopy(fcn)
    model_cl.zero_grad(set_to_none=True)
    place_model(model_cl, "cpu")
    place_model(fcn_cl, "cpu")
    logits_cl, grads_cl = _step(model_cl, fcn_cl, x, labels, sal)
    torch.testing.assert_close(logits_cl, logits, rtol=1e-4, atol=1e-5)
    assert grads_cl.keys() == grads.keys() and len(grads) == len(list(model.parameters()))
    for name, grad in grads.items():
        torch.testing.assert_close(grads_cl[name], grad, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_deeplab_in_channels_last_equals_the_default_layout() -> None:
    torch.manual_seed(0)
    model = build_deeplab("tiny", 3, "").eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = model(x)
        got = place_model(copy.deepcopy(model), "cpu")(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
