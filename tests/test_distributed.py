"""Multi-process training on CPU (gloo via torchrun): classifiers and stage 1, and the small distributed helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.toy import make_toy_dataset
from sp_cam import distributed as dist_utils
from sp_cam import train_cls, train_fcn
from sp_cam.config import save_config
from sp_cam.io import load_checkpoint
from sp_cam.models import build_classifier
from sp_cam.paths import RunPaths
from sp_cam.runtime import derive_seed, seed_everything
from tests.fcn_frozen_bn import build_frozen_bn_model
from tests.test_train_cls import TOY_SIZE, TOY_TRAIN, TOY_VAL, tiny_config
from tests.test_train_fcn import make_config, write_cams

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_TIMEOUT_S = 240


def torchrun(module_args: list[str], config_file: Path) -> subprocess.CompletedProcess:
    """Two CPU processes (gloo) of ``python -m MODULE ARGS -c CONFIG``; fails the test with the log tail on an error."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", *module_args, "-c", str(config_file)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not any("[rank 1]" in line and " INFO " in line for line in proc.stderr.splitlines())  # rank 0 logs
    return proc


def test_two_process_ddp_equals_one_process_on_the_same_global_batch(tmp_path):
    toy = make_toy_dataset(tmp_path / "toy", TOY_TRAIN, TOY_VAL, image_size=TOY_SIZE, seed=0)
    # one epoch = 2 optimizer steps of the global batch 4 (2 images per process); GT selection, sharded evaluation
    extra = ("cam.epochs=1", "cam.eval_max_images=4", "cam.lr=0.1", "cam.momentum=intended")
    single = tiny_config(tmp_path / "single", toy, *extra)
    train_cls.run(single, "cam")

    ddp = tiny_config(tmp_path / "ddp", toy, *extra)
    config_file = tmp_path / "ddp.yaml"
    save_config(ddp, config_file)
    torchrun(["sp_cam.train_cls", "cam"], config_file)

    a = load_checkpoint(RunPaths.model(RunPaths.from_work_dir(single.run.work_dir).cam))
    b = load_checkpoint(RunPaths.model(RunPaths.from_work_dir(ddp.run.work_dir).cam))
    seed_everything(derive_seed(single.run.seed))  # the initial weights of both runs
    init = build_classifier(single.cam, "cam", 5).state_dict()
    moved = max(float((a["model"][k] - init[k]).abs().max()) for k in init if init[k].is_floating_point())
    assert moved > 1e-3  # training really changed the weights
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert b["metrics"]["miou"] == pytest.approx(a["metrics"]["miou"], abs=1e-6)  # confusion summed over ranks
    assert b["metrics"]["map"] == pytest.approx(a["metrics"]["map"], abs=1e-6)


def test_two_process_stage1_equals_one_process_on_the_same_global_batch(tmp_path, monkeypatch):
    toy = make_toy_dataset(tmp_path / "toy", num_train=8, num_val=2, image_size=64, seed=0)
    # 8 images, global batch 4 (2 per process): 2 steps, the second with the affinity terms; sharded GT validation.
    # BN on running statistics in both runs: on CPU each process normalises with the statistics of its own batch.
    extra = ("toy.num_train=8", "fcn.epochs=1", "fcn.batch_size=4", "fcn.affinity_warmup=0")
    single = make_config(tmp_path / "single", toy, *extra)
    write_cams(tmp_path / "single", toy)
    monkeypatch.setattr(train_fcn, "build_model", build_frozen_bn_model)
    train_fcn.run(single)

    ddp = make_config(tmp_path / "ddp", toy, *extra)
    write_cams(tmp_path / "ddp", toy)
    config_file = tmp_path / "ddp.yaml"
    save_config(ddp, config_file)
    torchrun(["tests.fcn_frozen_bn"], config_file)

    dirs = [RunPaths.from_work_dir(cfg.run.work_dir).fcn for cfg in (single, ddp)]
    a, b = (load_checkpoint(RunPaths.model(d)) for d in dirs)
    seed_everything(derive_seed(single.run.seed))  # the initial weights of both runs
    init = build_frozen_bn_model(single.fcn).state_dict()
    moved = max(float((a["model"][k] - init[k]).abs().max()) for k in init if init[k].is_floating_point())
    assert moved > 1e-4  # training really changed the weights
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert b["metric"] == pytest.approx(a["metric"], abs=1e-6)  # confusion summed over ranks, same selection

    records = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in dirs]
    assert [(r["kind"], r["step"]) for r in records[1]] == [("eval", 0), ("train", 1), ("train", 2), ("epoch", 2)]
    assert [(r["kind"], r["step"]) for r in records[0]] == [(r["kind"], r["step"]) for r in records[1]]
    train_a, train_b = ([r for r in recs if r["kind"] == "train"] for recs in records)
    assert [r["affinity"] for r in train_b] == [False, True]
    for ra, rb in zip(train_a, train_b, strict=True):  # losses are means over the processes
        for key in ("loss", "loss_sem", "loss_pos", "loss_press", "loss_diff", "ignored_cells"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), key
    written = {"config.yaml", "metrics.jsonl", "best.pt", "last.pt", "model.pt", "DONE", "train.log", ".lock"}
    assert {p.name for p in dirs[1].iterdir()} == written  # one copy of each, no temporary file left
    assert (dirs[1] / ".lock").read_text() == ""  # the stage lock of rank 0, released


def test_every_global_batch_is_the_same_whatever_the_number_of_processes():
    """The engine's seeded DistributedSampler: global step k takes perm[k*B:(k+1)*B] of the one-process order."""
    from torch.utils.data import DistributedSampler

    n, batch, steps = 11, 4, 2  # the 3 images short of a third global batch are never used

    def order(rank: int, world: int) -> list[int]:
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
        sampler.set_epoch(3)
        return list(sampler)

    single = order(0, 1)
    assert single != sorted(single)
    for world in (2, 4):
        shares = [order(rank, world) for rank in range(world)]
        per = batch // world
        for k in range(steps):
            step = sorted(i for share in shares for i in share[k * per : (k + 1) * per])
            assert step == sorted(single[k * batch : (k + 1) * batch])


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
