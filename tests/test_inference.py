"""Stage-3 inference against a slow, obvious implementation of docs/method.md §4 (one pass at a time, all K+1 channels walked)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.transforms import inference_inputs
from net.psam import asam, hard_assignment, psam_upsample, random_walk
from sp_cam import inference
from sp_cam.inference import (
    evaluate_split,
    evaluate_split_confusion,
    infer_present,
    infer_scores,
    labels_from_present,
    labels_from_scores,
    majority_labels,
    superpixel_ids,
)

K = 4


class ToyFCN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 9, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(3 * self.conv(x), dim=1)


class ToyCAM(nn.Module):
    model_type = "cam"

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, K + 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 4 * F.avg_pool2d(self.conv(x), 16)


class ToySPCAM(ToyCAM):
    model_type = "spcam"

    def forward(self, x: torch.Tensor, psam: torch.Tensor) -> torch.Tensor:
        # uses the PSAM so that a wrong PSAM (e.g. not flipped with the image) changes the output
        return super().forward(x) + 2 * F.avg_pool2d(psam[:, :1] - psam[:, 4:5], 16)


def slow_scores(model, fcn, image, labels, scales, flip, t_list, upsample):
    """docs/method.md §4 literally: each pass alone, every t from scratch, all K+1 channels, tags times the normalised map."""
    H0, W0 = image.shape[-2:]
    H1, W1 = inference.scaled_size((H0, W0), 1.0)
    cam_path = fcn is None
    size = (H0, W0) if cam_path else (H1, W1)
    keys = [0] if cam_path else t_list
    acc = {t: torch.zeros(K + 1, *size) for t in keys}
    for s in scales:
        for flipped in [False, True] if flip else [False]:
            cls_in, fcn_in = inference_inputs(image, s, 16)
            if flipped:
                cls_in, fcn_in = cls_in.flip(-1), fcn_in.flip(-1)
            if cam_path:
                prob = torch.softmax(model(cls_in), 1)
                up = F.interpolate(prob, size=size, mode="bilinear", align_corners=False)
                acc[0] += (up.flip(-1) if flipped else up)[0]
                continue
            q = fcn(fcn_in)
            prob = torch.softmax(model(cls_in, q), 1)
            a = asam(q)
            for t in t_list:
                g = random_walk(prob, a, t)
                if upsample == "psam":
                    up = F.interpolate(psam_upsample(g, q), size=size, mode="bilinear", align_corners=False)
                else:
                    up = F.interpolate(g, size=size, mode="bilinear", align_corners=False)
                acc[t] += (up.flip(-1) if flipped else up)[0]
    tags = torch.cat([torch.ones(1), labels]).view(-1, 1, 1)
    out = {}
    for t, f in acc.items():
        cam = F.relu(f - 1e-5) / (F.relu(f).amax(dim=(1, 2), keepdim=True) + 1e-5) * tags
        cam = F.interpolate(cam[None], size=(H0, W0), mode="bilinear", align_corners=False)[0]
        cam[0] = 0
        out[t] = cam
    return out


@pytest.fixture
def nets():
    torch.manual_seed(0)
    return ToySPCAM().eval(), ToyFCN().eval(), ToyCAM().eval()


def _image(h=40, w=56, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, h, w, generator=g)


LABELS = torch.tensor([0.0, 1.0, 0.0, 1.0])


@pytest.mark.parametrize("upsample", ["psam", "bilinear"])
def test_infer_scores_matches_slow_reference(nets, upsample):
    model, fcn, _ = nets
    image, scales, t_list = _image(), [0.5, 1.0, 1.5], [0, 2, 5]
    fast = infer_scores(model, fcn, image, LABELS, scales, True, t_list, upsample=upsample)
    slow = slow_scores(model, fcn, image, LABELS, scales, True, t_list, upsample)
    assert sorted(fast) == t_list
    for t in t_list:
        assert fast[t].shape == (K + 1, 40, 56)
        torch.testing.assert_close(fast[t], slow[t], atol=2e-5, rtol=1e-4)
    # the walk and the upsampling mode both matter
    assert not torch.allclose(fast[0], fast[5], atol=1e-3)


def test_psam_and_bilinear_differ_and_share_one_pass(nets):
    model, fcn, _ = nets
    image = _image()
    both = infer_present(model, fcn, image, LABELS, [1.0], True, [0, 3], ("psam", "bilinear"))
    psam_only = infer_scores(model, fcn, image, LABELS, [1.0], True, [0, 3], upsample="psam")
    bil_only = infer_scores(model, fcn, image, LABELS, [1.0], True, [0, 3], upsample="bilinear")
    for t in (0, 3):
        torch.testing.assert_close(both.scores[("psam", t)], psam_only[t][[2, 4]])
        torch.testing.assert_close(both.scores[("bilinear", t)], bil_only[t][[2, 4]])
        assert (both.scores[("psam", t)] - both.scores[("bilinear", t)]).abs().max() > 1e-2


def test_flip_pair_batching_equals_separate_passes(nets, monkeypatch):
    """The flipped pass rides in the batch of the unflipped one; running them as two batches of 1 gives the same."""
    model, fcn, _ = nets
    image = _image(48, 64)
    batched = infer_scores(model, fcn, image, LABELS, [1.0, 0.5], True, [0, 4])
    calls = []
    model_fwd, fcn_fwd = model.forward, fcn.forward

    def one_at_a_time(fwd):
        def f(x, *rest):
            calls.append(x.shape[0])
            outs = [fwd(x[i : i + 1], *(r[i : i + 1] for r in rest)) for i in range(x.shape[0])]
            return torch.cat(outs)

        return f

    monkeypatch.setattr(model, "forward", one_at_a_time(model_fwd))
    monkeypatch.setattr(fcn, "forward", one_at_a_time(fcn_fwd))
    separate = infer_scores(model, fcn, image, LABELS, [1.0, 0.5], True, [0, 4])
    assert calls == [2, 2, 2, 2]  # one forward per scale for each network, each holding the flip pair
    for t in (0, 4):
        torch.testing.assert_close(batched[t], separate[t], atol=1e-6, rtol=1e-5)


def test_incremental_walk_equals_from_scratch(nets):
    model, fcn, _ = nets
    image = _image(32, 48)
    together = infer_scores(model, fcn, image, LABELS, [1.0], False, [6, 0, 3])
    for t in (0, 3, 6):
        alone = infer_scores(model, fcn, image, LABELS, [1.0], False, [t])
        torch.testing.assert_close(together[t], alone[t], atol=1e-6, rtol=1e-5)


def test_normalisation_and_tags(nets):
    model, fcn, cam = nets
    image = _image(48, 64)  # multiples of 16: no final resize, so the peak of each present channel is reached
    for m, f in ((model, fcn), (cam, None)):
        scores = infer_scores(m, f, image, LABELS, [1.0, 0.5], True, [0, 2])
        for s in scores.values():
            assert s.shape == (K + 1, 48, 64)
            assert float(s.min()) >= 0
            assert float(s[0].abs().max()) == 0  # background is replaced by th
            assert float(s[[1, 3]].abs().max()) == 0  # absent classes
            peaks = s[[2, 4]].amax(dim=(1, 2))
            torch.testing.assert_close(peaks, torch.ones(2), atol=1e-3, rtol=0)
    assert sorted(infer_scores(cam, None, image, LABELS, [1.0], False, [0, 20])) == [0]  # CAM path: t ignored


def test_cam_path_matches_slow_reference(nets):
    _, _, cam = nets
    image = _image()
    fast = infer_scores(cam, None, image, LABELS, [0.5, 1.0], True, [0, 20])
    slow = slow_scores(cam, None, image, LABELS, [0.5, 1.0], True, [0], "bilinear")
    torch.testing.assert_close(fast[0], slow[0], atol=2e-5, rtol=1e-4)


def test_spcam_without_fcn_is_an_error(nets):
    model, _, _ = nets
    with pytest.raises(ValueError, match="FCN"):
        infer_scores(model, None, _image(), LABELS)


def test_no_tags_gives_background(nets):
    model, fcn, _ = nets
    scores = infer_scores(model, fcn, _image(), torch.zeros(K), [1.0], False, [0, 2])
    assert all(float(s.abs().max()) == 0 for s in scores.values())
    assert int(labels_from_scores(scores[2], 0.3).max()) == 0


def test_labels_from_scores_and_present_agree():
    g = torch.Generator().manual_seed(3)
    dense = torch.rand(K + 1, 9, 11, generator=g)
    dense[[1, 3]] = 0
    dense[2, 0, 0] = 0.3  # a tie with th: background wins
    classes = torch.tensor([2, 4])
    for th in (0.2, 0.3, 0.4):
        ref = dense.clone()
        ref[0] = th
        expected = ref.argmax(0)
        torch.testing.assert_close(labels_from_scores(dense, th), expected)
        torch.testing.assert_close(labels_from_present(dense[classes], classes, th), expected)
    assert int(labels_from_scores(dense, 0.3)[0, 0]) != 2
    multi = labels_from_present(dense[classes], classes, [0.2, 0.4])
    assert multi.shape == (2, 9, 11)
    torch.testing.assert_close(multi[1], labels_from_scores(dense, 0.4))


def test_evaluate_split_counts_match_direct_computation(nets):
    model, fcn, _ = nets
    g = torch.Generator().manual_seed(5)
    data = []
    for i, (h, w) in enumerate([(32, 48), (40, 36), (48, 48)]):
        label = torch.zeros(K)
        label[[i % K, (i + 2) % K]] = 1
        mask = torch.randint(0, K + 1, (h, w), generator=g)
        mask[:3] = 255
        data.append({"id": f"im{i}", "image": torch.randn(3, h, w, generator=g), "label": label, "mask": mask})
    t_list, th_list = [0, 3], [0.2, 0.4]
    conf = evaluate_split_confusion(model, fcn, data, t_list, th_list, [1.0, 0.5], True)
    assert sorted(conf) == [(t, th) for t in t_list for th in th_list]
    for t in t_list:
        for th in th_list:
            direct = np.zeros((K + 1, K + 1), dtype=np.int64)
            for item in data:
                s = infer_scores(model, fcn, item["image"][None], item["label"], [1.0, 0.5], True, [t])[t]
                pred = labels_from_scores(s, th).numpy()
                gt = item["mask"].numpy()
                for gv, pv in zip(gt.reshape(-1), pred.reshape(-1), strict=True):
                    if gv != 255:
                        direct[gv, pv] += 1
            np.testing.assert_array_equal(conf[(t, th)], direct)
    res = evaluate_split(model, fcn, data, t_list, th_list, [1.0, 0.5], True, max_images=2)
    assert 0.0 <= res[(3, 0.2)].miou <= 100.0
    model.train()
    evaluate_split(model, fcn, data, [0], [0.3], [1.0], False)
    assert model.training and not fcn.training  # modes restored


def test_superpixel_ids_and_majority_labels():
    g = torch.Generator().manual_seed(7)
    q = torch.softmax(torch.randn(1, 9, 32, 48, generator=g) * 3, 1)
    ids = superpixel_ids(q)
    assert torch.equal(ids, hard_assignment(q)[0])  # one owner of the hard assignment (tested with loops there)
    assert superpixel_ids(q, size=(30, 45)).shape == (30, 45)
    gt = torch.randint(0, 4, (32, 48), generator=g)
    gt[:4] = 255
    maj = majority_labels(ids, gt, 4)
    for seg in torch.unique(ids).tolist():
        sel = ids == seg
        votes = torch.bincount(gt[sel & (gt != 255)], minlength=4)
        assert int(maj[sel].unique().numel()) == 1
        assert int(votes[maj[sel][0]]) == int(votes.max())
