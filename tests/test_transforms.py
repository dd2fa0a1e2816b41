"""Training transforms (joint resize / flip / crop with padding) and the inference inputs of docs/method.md §4 step 1."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    denormalize,
    hflip,
    inference_inputs,
    long_side_size,
    normalize,
    padded_size,
    random_crop_box,
    random_crop_pad,
    random_flip,
    random_resize_long,
    resize_sample,
    to_tensor_image,
)


def test_normalize_and_back():
    img = np.array([[[0, 128, 255]]], dtype=np.uint8)
    out = normalize(img)
    expect = (np.array([0, 128, 255]) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(out[0, 0], expect, rtol=1e-6)
    t = to_tensor_image(img)
    assert t.shape == (3, 1, 1)
    np.testing.assert_allclose(denormalize(t)[:, 0, 0].numpy(), [0, 128 / 255, 1], atol=1e-6)


def test_long_side_size():
    assert long_side_size(375, 500, 320) == (240, 320)
    assert long_side_size(500, 375, 640) == (640, 480)
    assert long_side_size(10, 1000, 100) == (1, 100)


def test_random_resize_long_range_and_joint_sizes():
    rng = np.random.default_rng(0)
    img = np.zeros((30, 40, 3), np.uint8)
    sal = np.zeros((30, 40), np.uint8)
    maps = np.zeros((30, 40, 3), np.float32)
    longs = set()
    for _ in range(50):
        i, s, m = random_resize_long(img, sal, maps, (20, 24), rng)
        assert i.shape[:2] == s.shape == m.shape[:2]
        assert m.shape[2] == 3
        longs.add(max(i.shape[:2]))
    assert longs == {20, 21, 22, 23, 24}
    with pytest.raises(ValueError):
        random_resize_long(img, sal, maps, (5, 4), rng)


def test_resize_interpolations():
    sal = np.zeros((4, 4), np.uint8)
    sal[:, 2:] = 255
    maps = np.zeros((4, 4, 300), np.float32)  # more channels than one cv2 call takes
    maps[:, 2:] = 1.0
    img = np.zeros((4, 4, 3), np.uint8)
    _, s, m = resize_sample(img, sal, maps, (8, 8))
    assert set(np.unique(s)) == {0, 255}  # nearest: no new values
    assert m.shape == (8, 8, 300) and 0 < m[0, 3, 0] < 1  # bilinear: intermediate values
    np.testing.assert_allclose(m[..., 0], m[..., 299])


def test_random_flip_is_joint():
    rng = np.random.default_rng(1)
    img = np.arange(12, dtype=np.uint8).reshape(1, 4, 3).repeat(2, 0)
    sal = img[..., 0].copy()
    maps = img[..., :2].astype(np.float32)
    flipped = 0
    for _ in range(40):
        i, s, m = random_flip(img, sal, maps, rng)
        np.testing.assert_array_equal(i[..., 0], s)
        np.testing.assert_array_equal(i[..., :2].astype(np.float32), m)
        flipped += int(i[0, 0, 0] != img[0, 0, 0])
    assert 5 < flipped < 35


def test_crop_box_larger_and_smaller():
    rng = np.random.default_rng(0)
    for _ in range(20):
        b = random_crop_box(100, 10, 32, rng)
        assert 0 <= b.src_y <= 68 and b.dst_y == 0 and b.h == 32
        assert b.src_x == 0 and 0 <= b.dst_x <= 22 and b.w == 10


def test_random_crop_pad_padding_and_valid():
    rng = np.random.default_rng(0)
    img = np.full((10, 20, 3), 5.0, np.float32)
    sal = np.full((10, 20), 9, np.uint8)
    maps = np.ones((10, 20, 2), np.float32)
    i, s, m, valid = random_crop_pad(img, sal, maps, 16, rng)
    assert i.shape == (16, 16, 3) and s.shape == (16, 16) and m.shape == (16, 16, 2)
    assert valid.sum() == 10 * 16
    np.testing.assert_array_equal(i[..., 0] != 0, valid > 0)
    np.testing.assert_array_equal(s != 0, valid > 0)  # docs/decisions.md D5: saliency padded with 0
    np.testing.assert_array_equal(m[..., 1], valid)


def test_padded_size_rounding():
    assert padded_size(375, 500, 0.5) == ((188, 250), (192, 256))
    assert padded_size(333, 500, 1.5) == ((500, 750), (512, 752))  # Python round: 499.5 -> 500
    assert padded_size(32, 48, 1.0) == ((32, 48), (32, 48))
    assert padded_size(20, 20, 1.0, cell_size=8) == ((20, 20), (24, 24))


def test_inference_inputs_match_spec():
    x = torch.randn(1, 3, 37, 50)
    for scale in (0.5, 1.0, 1.5, 2.0):
        cls_in, fcn_in = inference_inputs(x, scale)
        target, padded = padded_size(37, 50, scale)
        two_step = F.interpolate(
            F.interpolate(x, size=target, mode="bilinear", align_corners=False),
            size=padded,
            mode="bilinear",
            align_corners=False,
        )
        one_step = F.interpolate(x, size=padded, mode="bilinear", align_corners=False)
        assert cls_in.shape[-2:] == fcn_in.shape[-2:] == padded
        assert padded[0] % 16 == 0 and padded[1] % 16 == 0
        torch.testing.assert_close(cls_in, two_step)
        torch.testing.assert_close(fcn_in, one_step)
    # different paths give different tensors where a padding step exists
    cls_in, fcn_in = inference_inputs(x, 0.5)
    assert not torch.allclose(cls_in, fcn_in)
    y = torch.randn(1, 3, 32, 48)
    cls_in, fcn_in = inference_inputs(y, 1.0)
    assert torch.equal(cls_in, y) and torch.equal(fcn_in, y)
    with pytest.raises(ValueError):
        inference_inputs(torch.zeros(3, 8, 8), 1.0)


def test_hflip():
    x = torch.arange(6.0).view(1, 1, 2, 3)
    assert torch.equal(hflip(x)[0, 0, 0], torch.tensor([2.0, 1.0, 0.0]))
    assert torch.equal(hflip(hflip(x)), x)
