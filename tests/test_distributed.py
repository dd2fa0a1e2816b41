"""Multi-process training on CPU (gloo via torchrun) and the small distributed helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.toy import make_toy_dataset
from sp_cam import distributed as dist_utils
from sp_cam import train_cls
from sp_cam.config import save_config
from sp_cam.io import load_checkpoint
from sp_cam.paths import RunPaths
from tests.test_train_cls import TOY_SIZE, TOY_TRAIN, TOY_VAL, tiny_config

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_TIMEOUT_S = 240


def test_two_process_ddp_equals_one_process_on_the_same_global_batch(tmp_path):
    toy = make_toy_dataset(tmp_path / "toy", TOY_TRAIN, TOY_VAL, image_size=TOY_SIZE, seed=0)
    # one epoch = 2 optimizer steps of the global batch 4 (2 images per process); GT selection, sharded evaluation
    extra = ("cam.epochs=1", "cam.eval_max_images=4", "cam.lr=0.1", "cam.momentum=intended")
    single = tiny_config(tmp_path / "single", toy, *extra)
    train_cls.run(single, "cam")

    ddp = tiny_config(tmp_path / "ddp", toy, *extra)
    config_file = tmp_path / "ddp.yaml"
    save_config(ddp, config_file)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "sp_cam.train_cls", "cam", "-c", str(config_file)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]

    a = load_checkpoint(RunPaths.model(RunPaths.from_work_dir(single.run.work_dir).cam))
    b = load_checkpoint(RunPaths.model(RunPaths.from_work_dir(ddp.run.work_dir).cam))
    init = train_cls.build_model(single.cam, "cam", 5).state_dict()
    moved = max(float((a["model"][k] - init[k]).abs().max()) for k in init if init[k].is_floating_point())
    assert moved > 1e-3  # training really changed the weights
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert b["metrics"]["miou"] == pytest.approx(a["metrics"]["miou"], abs=1e-6)  # confusion summed over ranks
    assert b["metrics"]["map"] == pytest.approx(a["metrics"]["map"], abs=1e-6)
    assert not any("[rank 1]" in line and " INFO " in line for line in proc.stderr.splitlines())  # rank 0 logs


def test_batch_must_split_over_processes_and_micro_batches():
    assert dist_utils.micro_batch_size(32, 4, 1, "cam") == 8
    assert dist_utils.micro_batch_size(32, 1, 4, "cam") == 8
    with pytest.raises(ValueError, match=r"cam.batch_size=6 .* 2 x 2 = 4"):
        dist_utils.micro_batch_size(6, 2, 2, "cam")
    with pytest.raises(ValueError, match=r"fcn.batch_size=6 .* the number of processes \(4\)"):
        dist_utils.micro_batch_size(6, 4, 1, "fcn")


def test_shards_partition_the_items():
    items = [f"id{i}" for i in range(11)]
    shards = [dist_utils.shard(items, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == sorted(items) and all(len(s) in (3, 4) for s in shards)
    assert dist_utils.parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            dist_utils.parse_shard(bad)


def test_environment_without_torchrun_is_a_single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info, device = dist_utils.init_distributed("cpu")
    assert (info.rank, info.world_size, info.distributed, device.type) == (0, 1, False, "cpu")
    assert dist_utils.is_main() and not dist_utils.is_initialized()
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(dist_utils.all_reduce_mean(t), t)
    net = torch.nn.Linear(2, 2)
    assert dist_utils.wrap_ddp(net, device) is net
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK=2 WORLD_SIZE=2"):
        dist_utils.env_info()
