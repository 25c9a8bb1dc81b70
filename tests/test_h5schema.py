"""attention.h5 / crops.h5: round trip, batch appends, lazy slices, atomicity and refusal of stale files."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fgpipe.errors import ArtifactError
from fgpipe.h5schema import (
    ATTENTION_SCHEMA_VERSION,
    AttentionMeta,
    AttentionReader,
    AttentionWriter,
    CropsMeta,
    CropsReader,
    CropsWriter,
)

SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_C = "c" * 64


METHODS = ("gradcam", "oaam", "aolm")  # the selected method (oaam) is not the first stored


def _attention_meta() -> AttentionMeta:
    return AttentionMeta(
        method="oaam",
        layer="layer4",
        input_size=448,
        checkpoint_sha256=SHA_A,
        manifest_sha256=SHA_B,
        provenance={"params": {"threshold": 0.2}, "path": Path("data/x")},
        methods=METHODS,
    )


def _attention_data(n: int, seed: int = 0) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    return {
        "image_ids": [f"img_{i:03d}_ü" for i in range(n)],
        "labels": rng.integers(0, 5, n),
        "heatmaps": {m: rng.random((n, 14, 14), dtype=np.float32) for m in METHODS},
        "logits": rng.standard_normal((n, 5)).astype(np.float32),
        "predictions": rng.integers(0, 5, n),
    }


def _write_attention(path: Path, batches: list[int]) -> dict[str, list]:
    written: dict[str, list] = {k: [] for k in ("image_ids", "labels", "heatmaps", "logits", "predictions")}
    with AttentionWriter(path, _attention_meta(), (14, 14), 5) as w:
        for seed, n in enumerate(batches):
            data = _attention_data(n, seed)
            w.append(**data)
            for k, v in data.items():
                if k == "heatmaps":
                    v = np.stack([v[m] for m in METHODS], axis=1)  # (n, M, H, W)
                written[k].extend(list(v))
    return written


def test_attention_round_trip_and_lazy_slices(tmp_path: Path) -> None:
    path = tmp_path / "attention.h5"
    written = _write_attention(path, [4, 4, 3])
    with AttentionReader(path) as r:
        assert len(r) == 11 and r.heatmap_hw == (14, 14) and r.num_classes == 5
        assert r.meta == AttentionMeta(
            "oaam", "layer4", 448, SHA_A, SHA_B, {"params": {"threshold": 0.2}, "path": "data/x"}, METHODS
        )
        assert r.methods == METHODS
        assert r.image_ids() == written["image_ids"]
        part = r.read(3, 7)
        assert part.image_ids == written["image_ids"][3:7]
        np.testing.assert_array_equal(part.labels, written["labels"][3:7])
        every = np.stack(written["heatmaps"][3:7])  # (4, M, H, W)
        np.testing.assert_allclose(part.all_heatmaps, every, atol=1e-3)  # float16
        np.testing.assert_allclose(part.heatmaps, every[:, 1], atol=1e-3)  # the selected method's: oaam
        for m, name in enumerate(METHODS):
            np.testing.assert_array_equal(r.method_heatmaps(name, 3, 7), part.all_heatmaps[:, m])
        with pytest.raises(ArtifactError, match="holds no `bap` heatmaps"):
            r.method_heatmaps("bap")
        np.testing.assert_array_equal(part.logits, np.stack(written["logits"][3:7]))
        np.testing.assert_array_equal(part.predictions, written["predictions"][3:7])
        assert part.heatmaps.dtype == np.float32
        whole = list(r.iter_batches(5))
        assert [len(b.image_ids) for b in whole] == [5, 5, 1]
        assert sum((b.image_ids for b in whole), []) == written["image_ids"]
        r.check_source(manifest_sha256=SHA_B, checkpoint_sha256=SHA_A)  # matching: no error
    with h5py.File(path, "r") as f:
        heat = f["heatmap"]
        assert heat.dtype == np.float16 and heat.compression in ("gzip", "lzf")
        assert heat.maxshape == (None, 3, 14, 14) and heat.chunks is not None
        assert json.loads(f.attrs["methods"]) == list(METHODS)
        assert all(f[name].maxshape[0] is None for name in f)


def test_writer_appends_to_disk_batch_by_batch(tmp_path: Path) -> None:
    path = tmp_path / "attention.h5"
    with AttentionWriter(path, _attention_meta(), (14, 14), 5) as w:
        for i in range(3):
            w.append(**_attention_data(6, i))
            # the rows are in the file's datasets, not held by the writer
            assert len(w) == 6 * (i + 1)
            assert w._h5["heatmap"].shape == (6 * (i + 1), 3, 14, 14)
            assert w._h5["image_id"].shape == (6 * (i + 1),)
        assert not path.exists()  # only renamed onto the target when the block succeeds
    assert path.exists()


def test_tensors_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "attention.h5"
    data = _attention_data(2)
    with AttentionWriter(path, _attention_meta(), (14, 14), 5) as w:
        heat = {m: torch.as_tensor(v) for m, v in data["heatmaps"].items()}
        w.append(data["image_ids"], torch.as_tensor(data["labels"]), heat,
                 torch.as_tensor(data["logits"]), torch.as_tensor(data["predictions"]))
    with AttentionReader(path) as r:
        np.testing.assert_array_equal(r.read().logits, data["logits"])


def test_exception_in_writer_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "attention.h5"
    with pytest.raises(KeyError, match="boom"):
        with AttentionWriter(path, _attention_meta(), (14, 14), 5) as w:
            w.append(**_attention_data(3))
            raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []
    # an existing target is left untouched
    path.write_bytes(b"previous")
    with pytest.raises(ValueError, match="rows must have shape"):
        with AttentionWriter(path, _attention_meta(), (14, 14), 5) as w:
            bad = _attention_data(3)
            bad["heatmaps"] = np.zeros((3, 3, 7, 7))
            w.append(**bad)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["attention.h5"]


def test_writer_checks_batches(tmp_path: Path) -> None:
    with AttentionWriter(tmp_path / "a.h5", _attention_meta(), (14, 14), 5) as w:
        data = _attention_data(3)
        data["labels"] = data["labels"][:2]
        with pytest.raises(ValueError, match="`label` has 2 rows"):
            w.append(**data)
        data = _attention_data(3)
        data["heatmaps"]["aolm"][0, 0, 0] = 1e6  # beyond float16
        with pytest.raises(ValueError, match="infinite"):
            w.append(**data)
        data = _attention_data(3)
        del data["heatmaps"]["aolm"]
        with pytest.raises(ValueError, match=r"heatmaps must be given for exactly \['gradcam', 'oaam', 'aolm'\]"):
            w.append(**data)


@pytest.mark.parametrize(
    "edit, says",
    [
        (lambda d: d["heatmaps"]["oaam"].__setitem__((1, 0, 0), 1.5), r"dataset `heatmap`, row 4 \(image 'img_001_ü'\) holds values outside \[0, 1\]"),
        (lambda d: d["labels"].__setitem__(2, 5), r"dataset `label`, row 5 \(image 'img_002_ü'\) is not a class index in \[0, 4\]"),
        (lambda d: d["logits"].__setitem__((0, 1), np.nan), r"dataset `logits`, row 3 \(image 'img_000_ü'\) holds NaN or infinite values"),
    ],
    ids=["heatmap-above-1", "label-out-of-range", "logits-nan"],
)
def test_the_writer_applies_the_readers_value_rules(tmp_path: Path, edit, says: str) -> None:
    """A producer's bug stops at the append that carries it, naming the row, and no file is written: the readers'
    rules (one table per schema) hold on both sides."""
    path = tmp_path / "attention.h5"
    with pytest.raises(ValueError, match=says + r".*; the file is not written, as its readers would refuse it"):
        with AttentionWriter(path, _attention_meta(), (14, 14), 5) as w:
            w.append(**_attention_data(3, seed=1))
            bad = _attention_data(3, seed=2)
            edit(bad)
            w.append(**bad)
    assert list(tmp_path.iterdir()) == []
    meta = CropsMeta(method="bap", threshold=0.2, attention_sha256=SHA_A, manifest_sha256=SHA_B, checkpoint_sha256=SHA_C)
    box = np.array([[5.0, 1.0, 2.0, 4.0]], dtype=np.float32)  # x1 < x0
    with pytest.raises(ValueError, match=r"dataset `box`, row 0 \(image 'c0'\) is not a box \(x0, y0, x1, y1\)"):
        with CropsWriter(tmp_path / "crops.h5", meta, max_parts=2) as w:
            w.append(["c0"], box, [0.5], [False], np.zeros((1, 2, 4)), np.zeros((1, 2)), [0])
    assert list(tmp_path.iterdir()) == []


def test_refuses_other_sources(tmp_path: Path) -> None:
    path = tmp_path / "attention.h5"
    _write_attention(path, [2])
    with AttentionReader(path) as r:
        with pytest.raises(ArtifactError, match=rf"attention\.h5 was made from another manifest .*rerun `fgpipe extract-attention --dataset {tmp_path.name}`"):
            r.check_source(manifest_sha256=SHA_C)
        with pytest.raises(ArtifactError, match="another checkpoint"):
            r.check_source(manifest_sha256=SHA_B, checkpoint_sha256=SHA_C)


def test_refuses_wrong_version_kind_or_layout(tmp_path: Path) -> None:
    path = tmp_path / "attention.h5"
    with pytest.raises(ArtifactError, match="not found"):
        AttentionReader(path)
    path.write_text("not hdf5")
    with pytest.raises(ArtifactError, match="not a readable HDF5 file"):
        AttentionReader(path)
    path.unlink()
    _write_attention(path, [2])
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = ATTENTION_SCHEMA_VERSION + 1
    with pytest.raises(ArtifactError, match=f"attention.h5: schema version {ATTENTION_SCHEMA_VERSION + 1}"):
        AttentionReader(path)
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = ATTENTION_SCHEMA_VERSION
        del f.attrs["layer"]
    with pytest.raises(ArtifactError, match="missing attrs layer"):
        AttentionReader(path)
    with h5py.File(path, "a") as f:
        f.attrs["layer"] = "layer4"
        del f["logits"]
    with pytest.raises(ArtifactError, match="missing dataset `logits`"):
        AttentionReader(path)
    with h5py.File(path, "a") as f:
        f["logits"] = np.zeros((3, 5), np.float32)
    with pytest.raises(ArtifactError, match="different lengths"):
        AttentionReader(path)
    with pytest.raises(ArtifactError, match="not an fgpipe.crops file"):
        CropsReader(path)


# --------------------------------------------------------------------------- crops.h5
def test_crops_round_trip_and_refusal(tmp_path: Path) -> None:
    path = tmp_path / "crops.h5"
    meta = CropsMeta(method="bap", threshold=0.2, attention_sha256=SHA_A, manifest_sha256=SHA_B, checkpoint_sha256=SHA_C)
    rng = np.random.default_rng(0)
    boxes = rng.random((5, 4)).astype(np.float32) * 100
    parts = rng.random((5, 6, 4)).astype(np.float32) * 100
    boxes[:, 2:] += boxes[:, :2] + 1  # boxes the reader accepts: x0 < x1, y0 < y1
    parts[..., 2:] += parts[..., :2] + 1
    part_scores = rng.random((5, 6)).astype(np.float32)
    counts = np.array([6, 0, 3, 1, 6])
    fallback = np.array([False, True, False, False, True])
    with CropsWriter(path, meta, max_parts=6) as w:
        for sl in (slice(0, 2), slice(2, 5)):
            w.append([f"c{i}" for i in range(5)][sl], boxes[sl], boxes[sl, 0], fallback[sl], parts[sl],
                     part_scores[sl], counts[sl])
        with pytest.raises(ValueError, match=r"dataset `part_count`, row 5 \(image 'x'\) is outside \[0, 6\] \(the parts slots\)"):
            w.append(["x"], boxes[:1], boxes[:1, 0], fallback[:1], parts[:1], part_scores[:1], [7])
    with CropsReader(path) as r:
        assert r.meta == meta and len(r) == 5 and r.max_parts == 6
        rec = r.read()
        assert rec.image_ids == [f"c{i}" for i in range(5)]
        np.testing.assert_array_equal(rec.boxes, boxes)
        np.testing.assert_array_equal(rec.scores, boxes[:, 0])
        assert rec.fallback.dtype == bool and rec.fallback.tolist() == fallback.tolist()
        np.testing.assert_array_equal(rec.parts, parts)
        np.testing.assert_array_equal(rec.part_scores, part_scores)
        np.testing.assert_array_equal(rec.part_counts, counts)
        r.check_source(manifest_sha256=SHA_B, attention_sha256=SHA_A)
        with pytest.raises(ArtifactError, match="made from another attention file"):
            r.check_source(attention_sha256=SHA_C)
    with pytest.raises(ArtifactError, match="not an fgpipe.attention file"):
        AttentionReader(path)


def test_attention_meta_and_stored_methods_are_checked(tmp_path: Path) -> None:
    assert AttentionMeta("bap", "l", 1, SHA_A, SHA_B).methods == ("bap",)  # one method by default
    with pytest.raises(ValueError, match="must be distinct names and hold method `bap`"):
        AttentionMeta("bap", "l", 1, SHA_A, SHA_B, methods=("oaam", "aolm"))
    with pytest.raises(ValueError, match="distinct"):
        AttentionMeta("oaam", "l", 1, SHA_A, SHA_B, methods=("oaam", "oaam"))
    path = tmp_path / "attention.h5"
    _write_attention(path, [2])
    with h5py.File(path, "a") as f:
        f.attrs["methods"] = json.dumps(["gradcam", "oaam"])  # names 2 of the 3 stored maps
    with pytest.raises(ArtifactError, match="names 2 methods, `heatmap` holds 3"):
        AttentionReader(path)
    with h5py.File(path, "a") as f:
        f.attrs["methods"] = json.dumps(["gradcam", "aolm", "bap"])  # lacks the selected method
    with pytest.raises(ArtifactError, match=f"attrs `method` / `methods`.*rerun `fgpipe extract-attention --dataset {tmp_path.name}`"):
        AttentionReader(path)
    with h5py.File(path, "a") as f:
        f.attrs["methods"] = "oaam"
    with pytest.raises(ArtifactError, match="attr `methods` = 'oaam' is not a tuple"):
        AttentionReader(path)


def test_a_version_1_file_says_to_rerun_extract_attention(tmp_path: Path) -> None:
    path = tmp_path / "attention.h5"
    _write_attention(path, [2])
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 1
    with pytest.raises(ArtifactError, match="schema version 1, this fgpipe reads version 2; rerun `fgpipe extract-attention --dataset toy`"):
        AttentionReader(path, dataset="toy")  # the caller's name; else the file's folder's (data/NAME/attention.h5)


def test_a_single_method_file_takes_plain_maps(tmp_path: Path) -> None:
    path = tmp_path / "attention.h5"
    meta = AttentionMeta("bap", "layer4", 448, SHA_A, SHA_B)
    maps = np.random.default_rng(0).random((2, 14, 14), dtype=np.float32)
    with AttentionWriter(path, meta, (14, 14), 5) as w:
        w.append(["a", "b"], [0, 1], maps, np.zeros((2, 5)), [0, 0])
    with AttentionReader(path) as r:
        assert r.methods == ("bap",)
        np.testing.assert_allclose(r.read().heatmaps, maps, atol=1e-3)
