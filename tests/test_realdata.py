"""The whole chain on real photographs: a few classes of the shared CUB-200-2011 development set.

Runs only where ``../shared/realdata/cub200_2011_dev20`` exists (the images are not ours to redistribute and
never enter the repository); skipped elsewhere. The classes are copied (prepare refuses links that resolve outside the root) into a temporary
CUB_200_2011 root with the annotation files filtered to them, and the repo's real dvc.yaml runs the chain
with EfficientNet-Lite0's ImageNet weights at a small size.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tinyproject import REPO, dvc, make_project, ran

DEV20 = REPO.parent / "shared" / "realdata" / "cub200_2011_dev20" / "CUB_200_2011"
CLASSES = (1, 4, 36)  # Black-footed Albatross, Groove-billed Ani, Northern Flicker: three distinct birds

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not DEV20.is_dir(), reason=f"real CUB development set not found at {DEV20}"),
]


def subset_root(dst: Path, classes: tuple[int, ...]) -> Path:
    """A CUB_200_2011 root holding only ``classes``: annotation files filtered, image folders copied."""
    root = dst / "CUB_200_2011"
    (root / "images").mkdir(parents=True)
    labels = dict(line.split() for line in (DEV20 / "image_class_labels.txt").read_text().splitlines() if line.strip())
    keep = {image_id for image_id, label in labels.items() if int(label) in classes}
    for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt"):
        lines = (DEV20 / name).read_text().splitlines()
        (root / name).write_text("".join(f"{line}\n" for line in lines if line.split() and line.split()[0] in keep))
    (root / "classes.txt").write_text((DEV20 / "classes.txt").read_text())
    for line in (DEV20 / "classes.txt").read_text().splitlines():
        class_id, folder = line.split()
        if int(class_id) in classes:
            shutil.copytree(DEV20 / "images" / folder, root / "images" / folder)
    return root


def test_the_chain_on_real_birds(tmp_path: Path) -> None:
    root = subset_root(tmp_path / "raw", CLASSES)
    sections = {"model": {}, "train_backbone": {}, "attention": {}, "crops": {}, "train_refine": {}, "evaluate": {}}
    params = {
        "run": {"cub": str(root)},
        "datasets": {"cub": {"kind": "cub", "root": str(root), "val_fraction": 0.2}},
        "per_dataset": {"cub": sections},
        "prepare": {"data_dir": "data", "metrics_dir": "metrics", "cache_side": 256},
        "model": {"backbone": "efficientnet_lite0", "weights": "imagenet", "head": "plain", "output_stride": 16, "lcam": "none"},
        "train_backbone": {"input_size": 128, "epochs": 3, "batch_size": 16, "lr": 0.01},
        "attention": {"method": "oaam", "batch_size": 32},
        "crops": {"threshold": "auto", "preview_images": 2},
        "train_refine": {"input_size": 128, "epochs": 2, "batch_size": 16, "lr": 0.01},
        "evaluate": {"combine": "val"},
    }
    project = make_project(tmp_path / "project", params)
    out = dvc(project, "repro", threads=None, timeout=1800)
    stages = ["prepare", "train-backbone", "extract-attention", "extract-crops", "train-refine", "evaluate"]
    assert ran(out) == {f"{s}@cub" for s in stages}

    prepared = json.loads((project / "metrics/cub/prepare.json").read_text())
    assert prepared["classes"] == len(CLASSES) and prepared["with_box"] == prepared["images"]["total"]
    stage1 = json.loads((project / "metrics/cub/train_backbone.json").read_text())
    assert stage1["test"]["top1"] > 0.7  # three distinct species from ImageNet weights: far above chance (1/3)

    loc = json.loads((project / "metrics/cub/localization.json").read_text())
    for method in ("oaam", "gradcam", "aolm"):
        for split in ("train", "val", "test"):
            assert loc["methods"][method][split], (method, split)
    crops = json.loads((project / "metrics/cub/extract_crops.json").read_text())
    assert json.loads((project / "metrics/cub/extract_crops.provenance.json").read_text())["threshold_source"].startswith("auto")
    assert crops["localization"]["accuracy"] > 0.3  # real birds found from a classifier's heatmaps

    result = json.loads((project / "metrics/cub/evaluate.json").read_text())
    assert result["images"] == stage1["test"]["images"]
    for branch in ("raw", "object", "parts", "joint"):
        assert result[branch]["top1"] > 0.5, branch
