"""SpixelNet: shapes, gradients, parameter names of the published files, tolerant loader."""

from __future__ import annotations

import pytest
import torch

from net.spixel_fcn import SpixelNet, build_spixel_fcn, load_spixel_weights


@pytest.fixture(scope="module")
def model() -> SpixelNet:
    torch.manual_seed(0)
    return SpixelNet()


def test_forward_shape_softmax_and_backward(model):
    x = torch.randn(2, 3, 32, 48)
    model.train()
    q = model(x)
    assert q.shape == (2, 9, 32, 48)
    assert torch.allclose(q.sum(1), torch.ones(2, 32, 48), atol=1e-5)
    model.zero_grad()
    (q * torch.randn_like(q)).sum().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable)
    frozen = {n.split(".")[0] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"pred_mask1", "pred_mask2", "pred_mask3"}


def test_parameter_names_and_count(model):
    keys = set(model.state_dict())
    for k in ("conv0a.0.weight", "conv0a.1.running_mean", "conv4b.1.num_batches_tracked", "deconv3.0.weight"):
        assert k in keys
    assert "deconv0.0.bias" in keys and "conv3_1.0.weight" in keys
    assert tuple(model.state_dict()["deconv3.0.weight"].shape) == (256, 128, 4, 4)
    assert tuple(model.state_dict()["pred_mask0.weight"].shape) == (9, 16, 3, 3)
    assert all(f"pred_mask{i}.bias" in keys for i in range(4))
    n = sum(p.numel() for p in model.parameters())
    assert 2.2e6 < n < 2.4e6  # docs/method.md §2.1: about 2.29 M


def test_sync_batchnorm_conversion_keeps_parameters_and_names():
    torch.manual_seed(0)
    net = SpixelNet()
    params = dict(net.named_parameters())
    keys = list(net.state_dict())
    x = torch.randn(2, 3, 32, 32)
    expected = net.train()(x)
    assert net.convert_sync_batchnorm() is net
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 14 and all(type(m) is torch.nn.SyncBatchNorm for m in bns)
    assert list(net.state_dict()) == keys
    assert all(p is params[n] for n, p in net.named_parameters())  # an optimizer built before stays valid
    torch.testing.assert_close(net(x), expected)  # without a process group SyncBatchNorm is plain BN


def test_input_not_multiple_of_16_is_an_error(model):
    with pytest.raises(ValueError, match="multiple of 16"):
        model(torch.randn(1, 3, 40, 32))


def _reference_state(seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in SpixelNet().state_dict().items()}


def test_loader_bare_and_wrapped(tmp_path, model):
    state = _reference_state()
    bare = tmp_path / "Q_model_final.pth"
    torch.save(state, bare)
    wrapped = tmp_path / "SpixelNet_bsd_ckpt.tar"
    torch.save(
        {"epoch": 3, "arch": "SpixelNet1l_bn", "state_dict": {"module." + k: v for k, v in state.items()}}, wrapped
    )
    for path in (bare, wrapped):
        m = SpixelNet()
        load_spixel_weights(m, path)
        assert all(torch.equal(m.state_dict()[k], v) for k, v in state.items())
    m = build_spixel_fcn(str(bare))
    assert not m.training


def test_loader_accepts_missing_unused_heads(tmp_path):
    state = {
        k: v for k, v in _reference_state().items() if not k.startswith(("pred_mask1", "pred_mask2", "pred_mask3"))
    }
    path = tmp_path / "q.pth"
    torch.save(state, path)
    m = SpixelNet()
    load_spixel_weights(m, path)
    assert torch.equal(m.pred_mask0.weight, state["pred_mask0.weight"])


def test_loader_safetensors(tmp_path):
    from safetensors.torch import save_file

    state = _reference_state()
    path = tmp_path / "q.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    m = SpixelNet()
    load_spixel_weights(m, path)
    assert torch.equal(m.conv0a[0].weight, state["conv0a.0.weight"])


def test_loader_rejects_other_architectures(tmp_path):
    state = _reference_state()
    missing = dict(state)
    del missing["conv2a.0.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing keys \[conv2a.0.weight\]"):
        load_spixel_weights(SpixelNet(), tmp_path / "missing.pth")

    other = {"layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1), "fc.weight": torch.zeros(10, 2048)}
    torch.save({"state_dict": other}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="unexpected keys .*fc.weight"):
        load_spixel_weights(SpixelNet(), tmp_path / "resnet.pth")

    bad = dict(state)
    bad["pred_mask0.weight"] = torch.zeros(21, 16, 3, 3)
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="shape mismatches .*pred_mask0.weight"):
        load_spixel_weights(SpixelNet(), tmp_path / "shape.pth")

    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_spixel_weights(SpixelNet(), tmp_path / "nope.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_spixel_weights(SpixelNet(), tmp_path / "garbage.pth")
