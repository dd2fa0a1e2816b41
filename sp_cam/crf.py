"""Dense CRF post-processing of segmentation probabilities (``pydensecrf2``, optional), with deeplab-pytorch's
parameters as defaults (``seg.crf_*``): one Gaussian (position) and one bilateral (position + colour) pairwise term.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INSTALL_HINT = "pip install pydensecrf2 (builds from source with a C++ compiler, about a minute)"
PROB_FLOOR = 1e-8  # unaries are -log(p): keep them finite


@dataclass(frozen=True)
class CRFParams:
    iterations: int = 10
    pos_w: float = 3.0
    pos_xy_std: float = 1.0
    bi_w: float = 4.0
    bi_xy_std: float = 67.0
    bi_rgb_std: float = 3.0


def crf_available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    """Refine per-pixel class probabilities with a fully connected CRF.

    Args:
        image: (H, W, 3) uint8 RGB.
        probs: (C, H, W) float probabilities (summing to 1 over C).
    Returns:
        (C, H, W) float32 refined probabilities.
    Raises:
        ValueError: pydensecrf2 is not installed (the message says how to install it), or the shapes differ.
    """
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError:
        raise ValueError(f"dense CRF needs the package pydensecrf2: {INSTALL_HINT}") from None
    c, h, w = probs.shape
    if image.shape != (h, w, 3):
        raise ValueError(f"CRF: image {image.shape} and probabilities {probs.shape} differ in size")
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.maximum(probs, PROB_FLOOR).astype(np.float32))))
    crf.addPairwiseGaussian(sxy=params.pos_xy_std, compat=params.pos_w)
    crf.addPairwiseBilateral(
        sxy=params.bi_xy_std, srgb=params.bi_rgb_std, rgbim=np.ascontiguousarray(image), compat=params.bi_w
    )
    q = crf.inference(params.iterations)
    return np.asarray(q, dtype=np.float32).reshape(c, h, w)
