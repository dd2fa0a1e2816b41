"""torchrun entry of ``tests/test_distributed.py``: stage 1 with SpixelNet's BN on frozen (running) statistics.

On CPU (gloo) SpixelNet's BN keeps per-process batch statistics, so a 2-process step differs from the 1-process step on
the same global batch by design; with batch-independent BN every other part of the step must match.

    torchrun --nproc_per_node 2 -m tests.fcn_frozen_bn -c CONFIG [section.key=value ...]
"""

from __future__ import annotations

import sys

from net.frozen_bn import freeze_bn_stats
from net.spixel_fcn import SpixelNet
from sp_cam import train_fcn
from sp_cam.config import FCNConfig

_build_model = train_fcn.build_model


def build_frozen_bn_model(fcfg: FCNConfig) -> SpixelNet:
    """``train_fcn.build_model`` with every BN layer normalising with its running statistics."""
    return freeze_bn_stats(_build_model(fcfg))


if __name__ == "__main__":
    train_fcn.build_model = build_frozen_bn_model
    raise SystemExit(train_fcn.main(sys.argv[1:]))
