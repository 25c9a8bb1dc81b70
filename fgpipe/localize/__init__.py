"""Localisation: heatmap -> object box (section 4), MPALM part boxes (section 5), IoU and NMS; `sweep`: the
localisation of stored heatmaps over a threshold grid, per split."""

from fgpipe.localize.boxes import (
    ObjectBoxes,
    box_iou,
    cells_to_pixels,
    largest_component,
    nms,
    object_box,
    object_boxes,
    paired_iou,
)
from fgpipe.localize.mpalm import DEFAULT_SIZES, PartBoxes, mpalm_parts, mpalm_parts_batch, pyramid_sizes

__all__ = [
    "DEFAULT_SIZES",
    "ObjectBoxes",
    "PartBoxes",
    "box_iou",
    "cells_to_pixels",
    "largest_component",
    "mpalm_parts",
    "mpalm_parts_batch",
    "nms",
    "object_box",
    "object_boxes",
    "paired_iou",
    "pyramid_sizes",
]
