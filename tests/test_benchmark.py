"""tools/benchmark.py: the quick run produces every summary figure, and the fast forms agree with the reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tools import benchmark

SUMMARY_KEYS = (
    "ops_speedup",
    "ops_max_abs_diff",
    "postprocess_fraction",
    "rw_speedup_vs_pixel",
    "spcam_step_ratio",
    "loader_kept_speedup",
)


@pytest.mark.slow
def test_quick_run_writes_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert benchmark.main(["--quick", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu"
    for key in SUMMARY_KEYS:
        assert isinstance(report[key], (int, float)) and math.isfinite(report[key]), key
        assert report[key] >= 0, key
    assert report["ops_max_abs_diff"] < 1e-4
    # the fast stage-3 post-processing (present classes only) labels every pixel as the reference form does
    assert report["stage3_label_agreement"] >= 0.999
    assert report["pixel_walk_dense_vs_sparse_max_abs_diff"] < 1e-8
    # every case was timed; memory was measured for the operators, the peak of the fast forms is finite
    for name in (
        "ops/asam/fast",
        "ops/asam/reference",
        "walk/pixel_dense",
        "train/spcam",
        "loader/kept",
        "loader/new_per_epoch",
        "stage3/postprocess",
        *(f"layout/{part}_{name}" for part in benchmark.LAYOUT_PARTS for name in benchmark.LAYOUTS),
    ):
        case = report["cases"][name]
        assert case["median_s"] > 0 and case["min_s"] <= case["median_s"] <= case["max_s"], name
    assert all(
        report["cases"][f"ops/{op}/{form}"]["peak_mib"] is not None
        for op in benchmark.OPS
        for form in ("fast", "reference")
    )
    assert sorted(report["layout_speedup"]) == sorted(benchmark.LAYOUT_PARTS)
    assert all(v > 0 for v in report["layout_speedup"].values())
    assert report["pseudo"].get("images_per_s", 0) > 0, report["pseudo"]
    # large images: peak memory per megapixel of stage 3 and 4, with and without max_side (the image 4x the pixels)
    per_mp = report["large_peak_mib_per_mp"]
    assert sorted(per_mp) == ["stage3", "stage3_max_side", "stage4", "stage4_max_side"]
    assert all(v > 0 for v in per_mp.values())
    assert per_mp["stage3_max_side"] < per_mp["stage3"] and per_mp["stage4_max_side"] < per_mp["stage4"]
    assert {t["key"] for t in report["targets"]} >= set(benchmark.TARGETS)
    printed = capsys.readouterr().out
    assert "| ops/pool/fast |" in printed and "QUICK" in printed


def test_bad_size_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert benchmark.main(["--quick", "--size", "500", "500", "--sections", "ops", "--no-memory"]) == 2
    assert "multiples of the cell size" in capsys.readouterr().err
    assert benchmark.main(["--quick", "--sections", "ops,nope", "--no-memory"]) == 2
    assert "--sections" in capsys.readouterr().err


def test_summary_and_targets() -> None:
    s = benchmark.BenchSettings()
    results = {f"ops/{op}/fast": {"median_s": 1.0, "peak_mib": 1.0} for op in benchmark.OPS}
    results |= {f"ops/{op}/reference": {"median_s": 4.0, "peak_mib": 2.0} for op in benchmark.OPS}
    results |= {
        "stage3/forward_fcn": {"median_s": 2.0},
        "stage3/forward_classifier": {"median_s": 8.0},
        "stage3/postprocess": {"median_s": 2.0},
        "walk/superpixel": {"median_s": 0.1},
        "walk/pixel_dense": {"median_s": 100.0},
        "train/cam": {"median_s": 1.0},
        "train/spcam": {"median_s": 1.5},
        "layout/cam_contiguous": {"median_s": 3.0},
        "layout/cam_channels_last": {"median_s": 2.0},
    }
    results |= {"large/stage3": {"peak_mib": 3000.0}, "large/stage4_max_side": {"peak_mib": 1200.0}}
    summary = benchmark.summarise(s, results, {"ops_max_abs_diff": {"pool": 1e-7, "asam": 3e-7}})
    mp = s.large_size[0] * s.large_size[1] / 1e6
    assert summary["large_peak_mib_per_mp"] == {"stage3": 3000.0 / mp, "stage4_max_side": 1200.0 / 12.0}
    assert summary["ops_speedup"] == 4.0 and summary["ops_max_abs_diff"] == 3e-7
    assert summary["postprocess_fraction"] == 0.2
    assert summary["rw_speedup_vs_pixel"] == 1000.0 and summary["spcam_step_ratio"] == 1.5
    assert summary["layout_speedup"] == {"cam": 1.5, "spcam": None, "fcn": None, "stage3": None}
    targets = {t["key"]: t for t in benchmark.evaluate_targets(s, summary)}
    assert targets["ops_speedup"]["met"] and targets["spcam_step_ratio"]["met"]
    assert targets["postprocess_fraction"]["met"] is False and targets["postprocess_fraction"]["by"] == "2.00x over"
    assert targets["ops_lower_peak_memory"]["met"]
