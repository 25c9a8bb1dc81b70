"""MPALM part boxes of decoded object crops (METHODS.md section 5): the stage-1 backbone's feature map of each crop
through :func:`fgpipe.localize.mpalm_parts_batch`, as extract-crops finds them and ``fgpipe predict`` repeats."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fgpipe.checkpoints import require_finite
from fgpipe.config import CropsConfig
from fgpipe.loader import normalize
from fgpipe.localize import PartBoxes, mpalm_parts_batch
from fgpipe.models.wsdan import Stage1Net


def parts_of(
    model: Stage1Net, crops: torch.Tensor, boxes: np.ndarray, size: int, cfg: CropsConfig, device: torch.device,
    *, names: Sequence[str] | None = None, checkpoint: Path | None = None, dataset: str = "NAME",
) -> PartBoxes:
    """Section-5 MPALM parts of a batch of decoded object crops (B, 3, size, size) uint8 with their boxes (B, 4).

    With ``checkpoint`` (the network's file), non-finite features (a diverged network) are refused, naming the
    images ``names`` (B,) (default: their positions in the batch)."""
    with torch.no_grad():
        fmap = model.features(normalize(crops.to(device)))[model.feature_layer]  # (B, C, h, w)
    if checkpoint is not None:
        names = names if names is not None else [f"#{i}" for i in range(len(fmap))]
        require_finite(fmap, names, "features of the object crops", checkpoint, "stage1", dataset)
    return mpalm_parts_batch(
        fmap, boxes, size, top_k=cfg.part_top_k, sizes=cfg.part_sizes, iou=cfg.part_nms_iou, max_parts=cfg.max_parts
    )
