"""The decoded image cache (data/NAME/images.h5): contents against an independent resize, cuts against the
image files, refusal of a stale cache, atomic writes, the stages with and without it, prepare.cache_side."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import write_fake_aircraft, write_fake_cub
from PIL import Image

from fgpipe import imagecache
from fgpipe.checkpoints import load_checkpoint
from fgpipe.config import load_params
from fgpipe.errors import ArtifactError, ConfigError, DatasetError
from fgpipe.h5schema import IMAGES_SCHEMA_VERSION, ImagesMeta, ImagesReader, ImagesWriter
from fgpipe.imagecache import ImageCache, open_image_cache, resize_region
from fgpipe.loader import decode_region, load_regions, whole_image_requests
from fgpipe.manifest import read_manifest
from fgpipe.stages import evaluate, extract_attention, extract_crops, prepare, train_backbone, train_refine
from fgpipe.store import file_sha256, read_json

SIZES = [(96, 72), (72, 96), (90, 60), (40, 30)]  # (W, H): landscape, portrait, 3:2, one below every cache side


def smooth_image(seed: int, size: tuple[int, int]) -> np.ndarray:
    """A low-frequency colour pattern (H, W, 3) uint8: resampling it loses little, so cuts can be compared."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.empty((h, w, 3))
    for c in range(3):
        fx, fy, phase = rng.uniform(0.02, 0.08), rng.uniform(0.02, 0.08), rng.uniform(0, 6.3)
        out[..., c] = 128 + 90 * np.sin(fx * x + phase) * np.cos(fy * y + phase / 2) + 20 * (x / w - y / h)
    return np.clip(out, 0, 255).astype(np.uint8)


def write_smooth_folder(root: Path) -> None:
    """imagefolder layout, 2 classes: JPEGs (quality 95) and PNGs of every size in SIZES."""
    k = 0
    for split, per_class in (("train", 4), ("test", 2)):
        for cname in ("a", "b"):
            for i in range(per_class):
                path = root / split / cname / f"{i:02d}{'.jpg' if k % 2 == 0 else '.png'}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(smooth_image(k, SIZES[k % len(SIZES)])).save(path, quality=95)
                k += 1


def _prepared(tmp_path: Path, make_settings, side: int | None):
    root = tmp_path / "folder"
    write_smooth_folder(root)
    overrides = {} if side is None else {"prepare.cache_side": side}
    settings = make_settings("f", "imagefolder", root, overrides)
    prepare.run(settings, "f")
    d = settings.data_dir("f")
    return settings, root, read_manifest(d / "manifest.csv"), d / "images.h5"


def _decoded(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


# --------------------------------------------------------------------------- contents
def test_cache_holds_every_image_resized_as_an_independent_resize(tmp_path: Path, make_settings) -> None:
    settings, root, rows, path = _prepared(tmp_path, make_settings, 64)
    with ImagesReader(path) as reader:
        assert reader.meta.cache_side == 64
        assert reader.meta.manifest_sha256 == file_sha256(path.parent / "manifest.csv")
        assert reader.meta.provenance["dataset"] == "f"
        assert reader._h5.attrs["schema_version"] == IMAGES_SCHEMA_VERSION
        rec = reader.read()
        pixels = np.asarray(reader.pixels())
    assert rec.image_ids == [r.image_id for r in rows] and rec.paths == [r.path for r in rows]  # manifest order
    assert rec.original_wh.tolist() == [[r.width, r.height] for r in rows]
    start = 0
    for i, r in enumerate(rows):
        scale = min(1.0, 64 / max(r.width, r.height))
        cw, ch = round(r.width * scale), round(r.height * scale)
        assert rec.cached_wh[i].tolist() == [cw, ch] and rec.offsets[i] == start
        stored = pixels[start : start + cw * ch * 3].reshape(ch, cw, 3)
        start += cw * ch * 3
        decoded = _decoded(root / r.path)
        if scale == 1.0:
            np.testing.assert_array_equal(stored, decoded)  # small enough: stored as decoded
        else:  # torch's antialiased bilinear, an implementation independent of the cache's (PIL's)
            t = torch.from_numpy(decoded.copy()).permute(2, 0, 1)[None].float()
            want = F.interpolate(t, size=(ch, cw), mode="bilinear", antialias=True, align_corners=False)
            want = want[0].permute(1, 2, 0).round().clamp(0, 255).numpy()
            assert np.abs(stored.astype(np.float64) - want).max() <= 1.0
    assert start == len(pixels)
    assert any(r.width > 64 or r.height > 64 for r in rows) and any(max(r.width, r.height) <= 64 for r in rows)


def test_cache_holds_the_manifest_area_without_the_banner(tmp_path: Path, make_settings) -> None:
    root = tmp_path / "fgvc-aircraft-2013b"
    write_fake_aircraft(root)  # 8 x 30 images, the bottom 20 rows a banner the manifest drops
    settings = make_settings("air", "aircraft", root)
    prepare.run(settings, "air")
    rows = read_manifest(settings.data_dir("air") / "manifest.csv")
    cache = ImageCache(settings.data_dir("air") / "images.h5", root)
    assert len(cache) == len(rows) and (rows[0].width, rows[0].height) == (8, 10)
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(cache.image(i), _decoded(root / r.path)[:10])


def test_cache_file_is_byte_identical_when_rebuilt(tmp_path: Path, make_settings) -> None:
    """DVC hashes images.h5: rerunning prepare on the same data must not rerun every later stage."""
    settings, _, _, path = _prepared(tmp_path, make_settings, 64)
    first = file_sha256(path)
    prepare.run(settings, "f")
    assert file_sha256(path) == first


# --------------------------------------------------------------------------- cuts
@pytest.mark.parametrize("side, mean_tol, max_tol", [(512, 0.25, 3), (64, 0.75, 6)])
def test_region_cuts_match_decode_region_on_the_files(tmp_path: Path, make_settings, side, mean_tol, max_tol) -> None:
    _, root, rows, path = _prepared(tmp_path, make_settings, side)
    cache = open_image_cache(path, root, file_sha256(path.parent / "manifest.csv"), "f")
    assert cache is not None and cache.side == side
    diffs = []
    for r in rows:
        w, h = float(r.width), float(r.height)
        regions = [
            ((0.0, 0.0, w, h), (48, 48)),  # the whole image, as train-backbone loads it
            ((0.13 * w, 0.21 * h, 0.77 * w, 0.9 * h), (56, 56)),  # an object box, enlarged like train-refine's crops
            ((0.4 * w + 0.3, 0.3 * h + 0.6, 0.6 * w + 0.1, 0.55 * h), (24, 24)),  # a part box
            ((0.5, 1.25, w - 0.75, h - 2.5), (30, 20)),  # fractional edges near the border, another aspect
        ]
        for region, out_wh in regions:
            cut = cache.cut(root / r.path, region, out_wh)
            ref = decode_region(root / r.path, region, out_wh)
            assert cut is not None and cut.shape == ref.shape == (out_wh[1], out_wh[0], 3) and cut.dtype == np.uint8
            diffs.append(np.abs(cut.astype(np.int64) - ref.astype(np.int64)))
    assert np.mean([d.mean() for d in diffs]) <= mean_tol
    assert max(d.max() for d in diffs) <= max_tol
    assert cache.cut(tmp_path / "elsewhere.jpg", (0.0, 0.0, 4.0, 4.0), (4, 4)) is None  # not cached: the caller decodes


def test_loaders_cut_from_the_cache_and_fall_back_to_the_files(tmp_path: Path, make_settings) -> None:
    _, root, rows, path = _prepared(tmp_path, make_settings, 512)
    cache = ImageCache(path, root)
    with_cache = load_regions(whole_image_requests(root, rows, cache), (40, 40))
    from_files = load_regions(whole_image_requests(root, rows), (40, 40))
    assert with_cache.shape == from_files.shape == (len(rows), 3, 40, 40)
    assert (with_cache.int() - from_files.int()).abs().float().mean() < 0.5
    # a file the cache does not hold (e.g. `fgpipe predict` on a user's photo) is decoded
    other = tmp_path / "photo.png"
    Image.fromarray(smooth_image(99, (30, 20))).save(other)
    whole = (0.0, 0.0, 30.0, 20.0)
    np.testing.assert_array_equal(decode_region(other, whole, (15, 10), cache), decode_region(other, whole, (15, 10)))


def test_resize_region_equals_pil_resize_with_a_box() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(41, 53, 3), dtype=np.uint8)  # noise: the hardest case for resampling
    pil = Image.fromarray(image)
    fractional = [(3.3, 2.7, 40.1, 30.2), (0.0, 0.5, 53.0, 41.0), (10.25, 10.75, 12.5, 13.0), (48.6, 35.1, 53.0, 41.0)]
    for box in fractional:
        for out_wh in ((20, 15), (64, 64), (5, 9)):
            want = np.asarray(pil.resize(out_wh, Image.BILINEAR, box=box, reducing_gap=None))
            np.testing.assert_array_equal(resize_region(image, box, out_wh), want)
    for box in ((0.0, 0.0, 53.0, 41.0), (4.0, 6.0, 30.0, 41.0)):  # the whole image: torch's port of PIL's kernel
        for out_wh in ((20, 15), (64, 64), (26, 35)):
            want = np.asarray(pil.resize(out_wh, Image.BILINEAR, box=box, reducing_gap=None)).astype(np.int64)
            assert np.abs(resize_region(image, box, out_wh).astype(np.int64) - want).max() <= 1
    np.testing.assert_array_equal(resize_region(image, (0.0, 0.0, 53.0, 41.0), (53, 41)), image)


# --------------------------------------------------------------------------- refusals, atomicity, switching off
def test_stale_cache_is_refused_naming_the_file_and_the_fix(tmp_path: Path, make_settings) -> None:
    settings, root, _, path = _prepared(tmp_path, make_settings, 64)
    manifest = path.parent / "manifest.csv"
    manifest.write_text(manifest.read_text().replace(",train,", ",val,", 1))  # a valid manifest, another hash
    with pytest.raises(ArtifactError, match=re.escape(str(path)) + r".*another manifest.*`fgpipe prepare --dataset f`"):
        open_image_cache(path, root, file_sha256(manifest), "f")
    with pytest.raises(ArtifactError, match=re.escape(str(path)) + r".*`fgpipe prepare --dataset f`"):
        train_backbone.run(settings, "f")  # refused before any image is loaded


def test_cache_is_written_atomically(tmp_path: Path, make_settings, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, _, _, path = _prepared(tmp_path, make_settings, 64)
    good = file_sha256(path)
    real, calls = imagecache.cache_image, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("image file is truncated")
        return real(*args, **kwargs)

    monkeypatch.setattr(imagecache, "cache_image", failing)
    with pytest.raises(DatasetError, match=r"cannot decode .* for the image cache: OSError: image file is truncated"):
        prepare.run(settings, "f")
    assert file_sha256(path) == good  # the previous cache is untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["dataset.json", "images.h5", "manifest.csv"]  # no temp file
    path.unlink()
    calls.clear()
    with pytest.raises(DatasetError):
        prepare.run(settings, "f")
    assert not path.exists()
    with pytest.raises(ValueError, match=r"0 of 12 pixel bytes were written"):
        with ImagesWriter(tmp_path / "short.h5", ImagesMeta(cache_side=8, manifest_sha256="a" * 64), 12):
            pass
    assert not (tmp_path / "short.h5").exists() and not list(tmp_path.glob(".short.h5*"))


def test_cache_side_zero_writes_an_empty_cache_and_the_loaders_decode_the_files(tmp_path: Path, make_settings) -> None:
    settings, root, rows, path = _prepared(tmp_path, make_settings, 0)
    metrics = prepare.run(settings, "f").metrics
    assert metrics["image_cache"] == {"side": 0, "images": 0, "megabytes": 0.0}
    with ImagesReader(path) as reader:  # DVC's outs are static: the file is there, empty
        assert reader.meta.cache_side == 0 and len(reader) == 0 and reader.pixels().size == 0
    sha = file_sha256(path.parent / "manifest.csv")
    assert open_image_cache(path, root, sha, "f") is None
    path.unlink()
    assert open_image_cache(path, root, sha, "f") is None  # missing: decode the files, with a note


def test_tampered_cache_layout_is_refused(tmp_path: Path, make_settings) -> None:
    _, root, _, path = _prepared(tmp_path, make_settings, 64)
    with h5py.File(path, "r+") as h5:
        h5["offset"][1] += 3
    with pytest.raises(ArtifactError, match=r"`offset` and `cached_wh` do not tile .* rerun `fgpipe prepare --dataset f`"):
        ImageCache(path, root)


@pytest.mark.parametrize(
    "value, pattern",
    [
        (-1, r"prepare\.cache_side: .*greater than or equal to 0"),
        (16, r"prepare\.cache_side: .*0 \(no image cache\) or at least 32"),
        ("512", r"prepare\.cache_side: .*integer"),
        (9000, r"prepare\.cache_side: .*less than or equal to 8192"),
        (512.5, r"prepare\.cache_side: .*integer"),
    ],
)
def test_cache_side_is_validated(tmp_path: Path, value, pattern: str) -> None:
    params = {"run": {}, "datasets": {}, "prepare": {"cache_side": value}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=pattern):
        load_params(tmp_path / "params.yaml")


def test_cache_side_default_and_off(tmp_path: Path) -> None:
    for value, want in ((None, 512), (0, 0), (32, 32)):
        params = {"run": {}, "datasets": {}, "prepare": {} if value is None else {"cache_side": value}}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        assert load_params(tmp_path / "params.yaml").params.prepare.cache_side == want


# --------------------------------------------------------------------------- the stages
def _chain_params(base: Path, side: int) -> Path:
    params = {
        "run": {},
        "datasets": {"toy": {"kind": "cub", "root": "raw/CUB_200_2011", "val_fraction": 0.25}},
        "prepare": {"data_dir": "data", "metrics_dir": "metrics", "cache_side": side},
        "model": {"backbone": "tiny", "num_attentions": 4, "lcam": "block", "logit_scale": 10.0},
        "train_backbone": {"input_size": 32, "epochs": 1, "batch_size": 8, "warmup_epochs": 0.0, "device": "cpu"},
        "attention": {"method": "bap", "batch_size": 8},
        "crops": {"batch_size": 8, "preview_images": 0},
        "train_refine": {"input_size": 32, "epochs": 1, "batch_size": 8, "warmup_epochs": 0.0, "device": "cpu"},
        "evaluate": {"weight_step": 0.5},
    }
    (base / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return base / "params.yaml"


def _shapes(base: Path) -> dict[str, object]:
    d = base / "data/toy"
    shapes: dict[str, object] = {}
    for name in ("attention.h5", "crops.h5"):
        with h5py.File(d / name, "r") as h5:
            shapes.update({f"{name}/{k}": h5[k].shape for k in h5})
    for name in ("stage1/best.pt", "refine/best.pt"):
        state = load_checkpoint(d / name)
        shapes[name] = {k: tuple(v.shape) for k, v in state["model"].items()}
    shapes["evaluate"] = sorted(read_json(base / "metrics/toy/evaluate.json"))
    return shapes


def _refuse_to_open(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"an image file was opened: {args[0] if args else kwargs}")


@pytest.mark.usefixtures("one_torch_thread")
def test_stages_give_the_same_shapes_with_and_without_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results = {}
    for side in (0, 512):
        base = tmp_path / f"side{side}"
        write_fake_cub(base / "raw/CUB_200_2011", train_per_class=5, test_per_class=2, size=(40, 30))
        params = _chain_params(base, side)
        prepare.run(load_params(params), "toy")
        with monkeypatch.context() as mp:
            if side:  # with the cache no stage opens an image file
                mp.setattr(Image, "open", _refuse_to_open)
            for stage in (train_backbone, extract_attention, extract_crops, train_refine, evaluate):
                stage.run(load_params(params), "toy")
        results[side] = _shapes(base)
    assert results[0] == results[512]
    assert results[512]["attention.h5/heatmap"][0] == len(read_manifest(tmp_path / "side512/data/toy/manifest.csv"))


def test_manifest_rows_and_cache_rows_line_up(tmp_path: Path, make_settings) -> None:
    """ImageCache finds images by root / manifest path, as LoadRequest names them."""
    _, root, rows, path = _prepared(tmp_path, make_settings, 64)
    cache = ImageCache(path, root)
    assert all((root / r.path) in cache for r in rows) and cache.image_ids == [r.image_id for r in rows]


def test_jpeg_draft_path_maps_the_region_by_the_exact_scale(tmp_path: Path) -> None:
    """A 375-pixel-high JPEG drafted at 1/2 decodes to 188 rows, the last one block padding: the file path
    must still match a full decode + resize, last row included."""
    from PIL import Image

    from fgpipe.loader import decode_region

    h, w = 375, 500
    rng = np.random.default_rng(0)
    stripes = (np.arange(h) // 3 % 2 * 200 + 30)[:, None].repeat(w, axis=1)  # 3-row stripes: a misalignment shows
    pixels = np.stack([stripes, rng.integers(0, 255, (h, w)), np.full((h, w), 90)], axis=2).astype(np.uint8)
    path = tmp_path / "img.jpg"
    Image.fromarray(pixels).save(path, quality=95, subsampling=2)
    out = decode_region(path, (0.0, 0.0, float(w), float(h)), (200, 150)).astype(int)  # drafted at 1/2
    with Image.open(path) as img:
        ref = np.asarray(img.convert("RGB").resize((200, 150), Image.BILINEAR, reducing_gap=None)).astype(int)
    red = np.abs(out[..., 0] - ref[..., 0])  # the stripes: sharp, so a shifted row mapping is visible
    # DCT-scaled decoding filters the stripes a little differently everywhere; a mis-scaled mapping adds a
    # shift that grows towards the bottom (it was 3x the top rows' difference there)
    assert red[-20:].mean() < 1.5 * red[:20].mean() + 1, (red[:20].mean(), red[-20:].mean())
