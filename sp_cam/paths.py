"""Where a run writes: the one owner of the work-directory layout (every folder and file name of a run)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data.ids import path_inside

TRAINING_STAGES = ("cam", "fcn", "spcam", "seg", "seg_gt")  # stage folders written by the training engine
VOC_TEST_RESULTS = Path("results") / "VOC2012" / "Segmentation" / "comp6_test_cls"  # the VOC evaluation server layout


@dataclass(frozen=True)
class LabelOutputs:
    """Where one stage-3 pass writes: per-image scores (:mod:`sp_cam.score_store`), label PNGs, score maps, the
    (t, th) selection, the sweep and the DONE marker."""

    scores: Path
    labels: Path
    score_maps: Path
    selection: Path
    sweep: Path
    done: Path

    def scores_file(self, image_id: str) -> Path:
        return path_inside(self.scores, image_id, ".npz")

    def label(self, image_id: str) -> Path:
        return path_inside(self.labels, image_id, ".png")

    def score_map(self, image_id: str) -> Path:
        return path_inside(self.score_maps, image_id, ".npz")

    @property
    def folders(self) -> tuple[Path, ...]:
        """Every folder the pass writes (the selection, sweep and DONE sit in the folder of the scores)."""
        return (self.scores.parent, self.scores, self.score_maps, self.labels)


@dataclass(frozen=True)
class RunPaths:
    """Layout of ``run.work_dir``. Each stage writes only under its own folder; ``done`` markers close a stage."""

    root: Path

    @classmethod
    def from_work_dir(cls, work_dir: str | Path) -> RunPaths:
        return cls(Path(work_dir))

    # ------------------------------------------------------------------------------------------------ the run

    @property
    def config(self) -> Path:  # resolved config of the pipeline run
        return self.root / "config.yaml"

    @property
    def pipeline_log(self) -> Path:
        return self.root / "pipeline.log"

    @property
    def toy_data(self) -> Path:
        return self.root / "toy_data"

    @property
    def metrics(self) -> Path:  # final summary of the pipeline
        return self.root / "metrics.json"

    @property
    def ablation_table(self) -> Path:
        return self.root / "ablation.md"

    @property
    def figures(self) -> Path:  # figures rendered from the run (tools/visualize.py)
        return self.root / "figures"

    # ------------------------------------------------------------------------------------- training stages

    @property
    def cam(self) -> Path:  # stage A: CAM baseline training
        return self.root / "cam"

    @property
    def fcn(self) -> Path:  # stage 1: superpixel FCN training
        return self.root / "fcn"

    @property
    def spcam(self) -> Path:  # stage 2: SP-CAM training
        return self.root / "spcam"

    @property
    def seg(self) -> Path:  # stage 4: the segmentation network trained on the pseudo labels
        return self.root / "seg"

    @property
    def seg_gt(self) -> Path:  # stage 4 on the GT masks: the fully supervised reference
        return self.root / "seg_gt"

    def stage(self, name: str) -> Path:
        """The folder of training stage ``name`` (one of ``TRAINING_STAGES``)."""
        if name not in TRAINING_STAGES:
            raise ValueError(f"unknown training stage {name!r}; expected one of {', '.join(TRAINING_STAGES)}")
        return self.root / name

    @staticmethod
    def model(stage_dir: Path) -> Path:
        """Final weights of a training stage (written once the stage is complete)."""
        return stage_dir / "model.pt"

    @staticmethod
    def last_checkpoint(stage_dir: Path) -> Path:
        """Full training state after the last finished epoch (for resume)."""
        return stage_dir / "last.pt"

    @staticmethod
    def best_checkpoint(stage_dir: Path) -> Path:
        """Weights of the best evaluated epoch so far (``select: gt``)."""
        return stage_dir / "best.pt"

    @staticmethod
    def metrics_log(stage_dir: Path) -> Path:
        """JSON-lines training and evaluation records of a stage."""
        return stage_dir / "metrics.jsonl"

    @staticmethod
    def train_log(stage_dir: Path) -> Path:
        return stage_dir / "train.log"

    @staticmethod
    def eval_log(stage_dir: Path) -> Path:
        return stage_dir / "eval.log"

    @staticmethod
    def stage_config(stage_dir: Path) -> Path:
        """The resolved config a stage ran with."""
        return stage_dir / "config.yaml"

    @staticmethod
    def tensorboard(stage_dir: Path) -> Path:
        return stage_dir / "tensorboard"

    @staticmethod
    def done(stage_dir: Path) -> Path:
        return stage_dir / "DONE"

    # ------------------------------------------------------------------------------------------- step B

    @property
    def cams(self) -> Path:  # step B: exported baseline CAMs (<id>.npz)
        return self.root / "cams"

    def cam_file(self, image_id: str) -> Path:
        return path_inside(self.cams, image_id, ".npz")

    @staticmethod
    def started(stage_dir: Path) -> Path:
        """The inputs a stage with per-file outputs (step B) records before it writes the first of them."""
        return stage_dir / "STARTED"

    @property
    def export_log(self) -> Path:
        return self.cams / "export.log"

    # ------------------------------------------------------------------------------------------- stage 3

    @property
    def pseudo(self) -> Path:  # stage 3: scores, sweep, selection, ablation
        return self.root / "pseudo"

    @property
    def pseudo_log(self) -> Path:
        return self.root / "pseudo.log"

    def _label_pass(self, folder: str, labels: str) -> LabelOutputs:
        """The outputs of a stage-3 pass: its scores, selection, sweep and DONE in ``folder``, its PNGs in ``labels``."""
        root = self.root / folder
        return LabelOutputs(
            scores=root / "scores",
            labels=self.root / labels,
            score_maps=root / "score_maps",
            selection=root / "selection.json",
            sweep=root / "sweep.json",
            done=root / "DONE",
        )

    @property
    def pseudo_outputs(self) -> LabelOutputs:
        """Stage 3 on ``data.pseudo_split``: the seed labels, scored and swept (the reported pseudo-label mIoU)."""
        return self._label_pass("pseudo", "pseudo_labels")

    @property
    def seg_label_outputs(self) -> LabelOutputs:
        """Stage 3 on ``seg.train_split`` when it is not ``data.pseudo_split``: the labels stage 4 trains on, at the
        (t, th) selected on ``data.pseudo_split``."""
        return self._label_pass("pseudo_seg", "seg_labels")

    @property
    def heldout_outputs(self) -> LabelOutputs:
        """Stage 3 on ``pseudo.heldout_split``: scores and the (t, th) selected there with GT (no label PNGs)."""
        return self._label_pass("pseudo_heldout", "pseudo_heldout/labels")

    @property
    def scores(self) -> Path:  # stage 3: per-image scores and confusion matrices (sp_cam.score_store)
        return self.pseudo_outputs.scores

    def scores_file(self, image_id: str) -> Path:
        return self.pseudo_outputs.scores_file(image_id)

    def score_map(self, image_id: str) -> Path:  # pseudo.save_scores: fused maps of the chosen t (cam_store format)
        return self.pseudo_outputs.score_map(image_id)

    @property
    def selection(self) -> Path:  # the chosen (t, th) and how
        return self.pseudo_outputs.selection

    @property
    def sweep(self) -> Path:  # mIoU of every (t, th)
        return self.pseudo_outputs.sweep

    @property
    def ablation(self) -> Path:
        return self.pseudo / "ablation.json"

    @property
    def pseudo_labels(self) -> Path:  # stage 3: final pseudo-label PNGs (<id>.png)
        return self.pseudo_outputs.labels

    def pseudo_label(self, image_id: str) -> Path:
        return self.pseudo_outputs.label(image_id)

    @property
    def seg_labels(self) -> Path:  # stage 3 labels of seg.train_split when it is not data.pseudo_split (<id>.png)
        return self.seg_label_outputs.labels

    # ------------------------------------------------------------------------------------------- stage 4

    @staticmethod
    def seg_scores(stage_dir: Path, split: str) -> Path:
        """Per-image confusion matrices of every inference mode (``<id>.npz``), for resuming the evaluation."""
        return path_inside(stage_dir / "eval", split)

    @staticmethod
    def seg_score_file(stage_dir: Path, split: str, image_id: str) -> Path:
        return path_inside(RunPaths.seg_scores(stage_dir, split), image_id, ".npz")

    @staticmethod
    def seg_predictions(stage_dir: Path, split: str) -> Path:
        """Predicted label PNGs (``<id>.png``) of the final inference mode."""
        return path_inside(stage_dir / "predictions", split)

    @staticmethod
    def seg_prediction(stage_dir: Path, split: str, image_id: str) -> Path:
        return path_inside(RunPaths.seg_predictions(stage_dir, split), image_id, ".png")

    @staticmethod
    def seg_summary(stage_dir: Path, split: str) -> Path:
        """mIoU of every inference mode on ``split`` (JSON); written last, so it closes the evaluation."""
        return path_inside(stage_dir, f"eval_{split}", ".json")

    @staticmethod
    def voc_test_results(stage_dir: Path) -> Path:
        """The folder of PNGs to upload to the VOC evaluation server."""
        return stage_dir / VOC_TEST_RESULTS

    @staticmethod
    def voc_test_result(stage_dir: Path, image_id: str) -> Path:
        return path_inside(RunPaths.voc_test_results(stage_dir), image_id, ".png")
