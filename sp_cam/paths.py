"""Where a run writes: the one owner of the work-directory layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    """Layout of ``run.work_dir``. Each stage writes only under its own folder; ``done`` markers close a stage."""

    root: Path

    @classmethod
    def from_work_dir(cls, work_dir: str | Path) -> RunPaths:
        return cls(Path(work_dir))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def toy_data(self) -> Path:
        return self.root / "toy_data"

    @property
    def cam(self) -> Path:  # stage A: CAM baseline training
        return self.root / "cam"

    @property
    def cams(self) -> Path:  # step B: exported baseline CAMs (<id>.npz)
        return self.root / "cams"

    @property
    def fcn(self) -> Path:  # stage 1: superpixel FCN training
        return self.root / "fcn"

    @property
    def spcam(self) -> Path:  # stage 2: SP-CAM training
        return self.root / "spcam"

    @property
    def pseudo(self) -> Path:  # stage 3: scores, sweep, ablation
        return self.root / "pseudo"

    @property
    def pseudo_labels(self) -> Path:  # stage 3: final pseudo-label PNGs (<id>.png)
        return self.root / "pseudo_labels"

    @property
    def metrics(self) -> Path:  # final summary of the pipeline
        return self.root / "metrics.json"

    @property
    def ablation_table(self) -> Path:
        return self.root / "ablation.md"

    @staticmethod
    def model(stage_dir: Path) -> Path:
        """Final weights of a training stage (written once the stage is complete)."""
        return stage_dir / "model.pt"

    @staticmethod
    def last_checkpoint(stage_dir: Path) -> Path:
        """Full training state after the last finished epoch (for resume)."""
        return stage_dir / "last.pt"

    @staticmethod
    def done(stage_dir: Path) -> Path:
        return stage_dir / "DONE"
