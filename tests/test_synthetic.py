"""The built-in synthetic dataset: determinism, caching, layout, boxes, fine-grained classes, prepare."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from fgpipe.config import SYNTHETIC_MAX_CLASSES, DatasetConfig, SyntheticOptions, load_params
from fgpipe.datasets import synthetic as syn
from fgpipe.datasets import synthetic_reader
from fgpipe.datasets.base import SourceListing
from fgpipe.errors import ConfigError, DatasetError
from fgpipe.manifest import read_manifest
from fgpipe.stages import prepare
from tests.conftest import write_params

TINY = SyntheticOptions(num_classes=3, train_per_class=3, test_per_class=2, image_size=64, distractors=3, seed=7)


def listing_of(root: Path) -> SourceListing:
    return synthetic_reader.read(root, DatasetConfig(kind="synthetic", root=str(root)))


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- generate: determinism and caching
def test_same_options_give_identical_files(tmp_path: Path) -> None:
    syn.generate(tmp_path / "a", TINY)
    syn.generate(tmp_path / "b", TINY)
    a, b = files_of(tmp_path / "a"), files_of(tmp_path / "b")
    assert a == b
    n = TINY.num_classes * (TINY.train_per_class + TINY.test_per_class)
    assert sum(k.endswith(".jpg") for k in a) == n
    assert {"annotations.csv", "parts.csv", "classes.csv", "synthetic.json"} <= set(a)


def test_second_call_rewrites_nothing(tmp_path: Path) -> None:
    root = tmp_path / "syn"
    syn.generate(root, TINY)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    syn.generate(root, TINY)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_changed_options_regenerate_cleanly(tmp_path: Path) -> None:
    root = tmp_path / "syn"
    syn.generate(root, TINY)
    other = dataclasses.replace(TINY, num_classes=2, train_per_class=2, seed=8)
    syn.generate(root, other)
    assert syn.is_current(root, other) and not syn.is_current(root, TINY)
    listing = listing_of(root)
    assert len(listing.records) == 2 * (2 + TINY.test_per_class)
    assert len(list(root.rglob("*.jpg"))) == len(listing.records)  # nothing of the old dataset is left
    assert [p.name for p in tmp_path.iterdir()] == ["syn"]  # no temporary folder is left either


def test_interrupted_generation_leaves_no_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "syn"
    syn.generate(root, TINY)
    old = files_of(root)
    calls = {"n": 0}
    real_render = syn.render

    def failing(spec: syn.ImageSpec) -> syn.Rendered:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_render(spec)

    monkeypatch.setattr(syn, "render", failing)
    with pytest.raises(KeyboardInterrupt):
        syn.generate(root, dataclasses.replace(TINY, seed=9))
    assert files_of(root) == old  # the previous complete dataset is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["syn"]


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    (root / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(DatasetError, match=r"photos.*no synthetic.json"):
        syn.generate(root, TINY)
    assert (root / "holiday.jpg").read_bytes() == b"not ours"


# --------------------------------------------------------------------------- read
def test_reader_lists_every_image_per_class_and_split(tmp_path: Path) -> None:
    root = tmp_path / "syn"
    syn.generate(root, TINY)
    listing = listing_of(root)
    assert listing.classes == syn.class_names(TINY.num_classes)
    for cname, split in itertools.product(listing.classes, ("train", "test")):
        want = TINY.train_per_class if split == "train" else TINY.test_per_class
        assert sum(r.class_name == cname and r.split == split for r in listing.records) == want
    for r in listing.records:
        assert (root / r.path).is_file() and r.path.startswith(f"images/{r.class_name}/")
        assert r.origin.startswith(str(root / "annotations.csv") + ":")
        x0, y0, x1, y1 = r.box  # type: ignore[misc]
        assert 0 <= x0 < x1 <= TINY.image_size and 0 <= y0 < y1 <= TINY.image_size


def test_written_boxes_are_the_rendered_ones(tmp_path: Path) -> None:
    root = tmp_path / "syn"
    syn.generate(root, TINY)
    parts = synthetic_reader.read_parts(root)
    for r in listing_of(root).records:
        k = syn.class_names(TINY.num_classes).index(r.class_name)
        index = int(r.image_id.rsplit("_", 1)[1])
        rendered = syn.render(syn.sample_spec(TINY, k, r.split, index))
        assert r.box == rendered.box
        assert parts[r.image_id] == rendered.part_boxes()
        assert set(parts[r.image_id]) == set(syn.PARTS)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("id,path\n", r"annotations.csv:1: header must be"),
        ("image_id,path,class_name,split,x0,y0,x1,y1\na,images/x.jpg,{c},train,1,2,3\n", r"annotations.csv:2: expected 8 fields"),
        ("image_id,path,class_name,split,x0,y0,x1,y1\na,images/x.jpg,nope,train,1,2,3,4\n", r"annotations.csv:2: class 'nope'"),
        ("image_id,path,class_name,split,x0,y0,x1,y1\na,images/x.jpg,{c},val,1,2,3,4\n", r"annotations.csv:2: split must be"),
        ("image_id,path,class_name,split,x0,y0,x1,y1\na,images/x.jpg,{c},test,1,2,x,4\n", r"annotations.csv:2: box values"),
        (
            "image_id,path,class_name,split,x0,y0,x1,y1\na,../x.jpg,{c},test,1,2,3,4\n",
            r"annotations.csv:2: path '../x.jpg' escapes",
        ),
    ],
)
def test_reader_errors_name_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    root = tmp_path / "syn"
    syn.generate(root, TINY)
    (root / "annotations.csv").write_text(content.format(c=syn.class_names(TINY.num_classes)[0]))
    with pytest.raises(DatasetError, match=message):
        listing_of(root)


def test_reader_says_how_to_get_a_missing_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="fgpipe prepare --dataset"):
        listing_of(tmp_path / "absent")


# --------------------------------------------------------------------------- rendering
def test_boxes_are_tight_around_the_object() -> None:
    opts = SyntheticOptions(image_size=96)
    for k, i in itertools.product(range(opts.num_classes), range(3)):
        r = syn.render(syn.sample_spec(opts, k, "train", i))
        x0, y0, x1, y1 = (int(v) for v in r.box)
        assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
        inside = np.zeros_like(r.object_mask)
        inside[y0:y1, x0:x1] = True
        assert not (r.object_mask & ~inside).any()  # every object pixel is inside the box
        # ... and the box is tight: the object touches all four sides
        assert r.object_mask[y0].any() and r.object_mask[y1 - 1].any()
        assert r.object_mask[:, x0].any() and r.object_mask[:, x1 - 1].any()
        for part, (px0, py0, px1, py1) in r.part_boxes().items():
            assert x0 <= px0 < px1 <= x1 and y0 <= py0 < py1 <= y1, part


def test_classes_differ_only_inside_the_changed_parts() -> None:
    """Every marking of every part, against a base bird in the same pose: the silhouette is the same and
    the pixels differ only inside the box of the part whose marking changed, and visibly (>= 12 pixels)."""
    opts = SyntheticOptions(image_size=224, object_size=(0.27, 0.27))
    base_spec = dataclasses.replace(syn.sample_spec(opts, 0, "test", 0), attributes=(0, 0, 0, 0))
    base = syn.render(base_spec)
    for p, part in enumerate(syn.PARTS):
        for m in range(1, len(syn.MARKINGS[part])):
            attrs = tuple(m if q == p else 0 for q in range(len(syn.PARTS)))
            other = syn.render(dataclasses.replace(base_spec, attributes=attrs))
            assert np.array_equal(other.object_mask, base.object_mask)
            diff = np.abs(other.image.astype(int) - base.image.astype(int)).max(axis=2) > 0
            changed = syn.PLUMAGE_PARTS if part == "body" and m in syn.PLUMAGE else (part,)  # plumage: head, tail, body
            boxes = np.array([base.part_boxes()[q] for q in changed])
            x0, y0 = (int(v) for v in boxes[:, :2].min(axis=0))
            x1, y1 = (int(v) for v in boxes[:, 2:].max(axis=0))
            assert diff.sum() >= 12, (part, syn.MARKINGS[part][m])
            assert not diff[:y0].any() and not diff[y1:].any() and not diff[:, :x0].any() and not diff[:, x1:].any()


def test_plain_decoys_carry_no_marking() -> None:
    """decoy_markings false: lone-part distractors are drawn in the part's colour only; the image is otherwise
    the same and differs from the marked version only inside the decoy (independent of the object)."""
    marked = SyntheticOptions(image_size=128, distractors=12, decoy_markings=True)
    plain = dataclasses.replace(marked, decoy_markings=False)
    seen = 0
    for i in range(6):
        a, b = syn.sample_spec(marked, 0, "train", i), syn.sample_spec(plain, 0, "train", i)
        assert a.pose == b.pose and a.background_seed == b.background_seed
        for da, db in zip(a.distractors, b.distractors):
            assert dataclasses.replace(da, marking=0) == dataclasses.replace(db, marking=0)
            assert db.marking == (-1 if db.kind == "part" else 0)
        decoys = [d for d in a.distractors if d.kind == "part"]
        if not decoys:
            continue
        seen += 1
        ra, rb = syn.render(a), syn.render(b)
        assert np.array_equal(ra.object_mask, rb.object_mask)
        diff = np.abs(ra.image.astype(int) - rb.image.astype(int)).max(axis=2) > 0
        assert diff.any() and not (diff & ra.object_mask).any()  # only decoy pixels changed, never the object
        # one plain decoy alone on the background: no marking colour anywhere
        lone = dataclasses.replace(b, distractors=(dataclasses.replace(decoys[0], marking=-1),))
        img = np.zeros((128, 128, 3), dtype=np.float32)
        syn._draw_distractor(img, lone.distractors[0], np.ones(3))
        drawn = img.reshape(-1, 3)[np.abs(img).sum(axis=2).reshape(-1) > 0]
        for colour in (syn.RED, syn.WHITE, syn.YELLOW):
            assert not (np.abs(drawn - colour).max(axis=1) < 30).any()
    assert seen >= 2


def test_class_markings_choose_what_classes_draw_from() -> None:
    """class_markings: a part with one marking is the same for every class; the others vary over theirs only."""
    opts = SyntheticOptions(
        num_classes=8, class_markings={"head": ["redcrown"], "wing": ["wingbars", "wingspots"],
                                       "tail": ["tailband", "tailstripes"], "body": ["spotted", "streaked"]},
    )
    palette = syn.marking_palette(opts)
    assert palette == ((0,), (0, 1), (1, 3), (1, 2))
    assert syn.marking_counts(8, palette) == (1, 2, 2, 2)  # the head cannot vary, so the body does
    attrs = syn.class_attributes(8, palette)
    assert len(set(attrs)) == 8 and {a[0] for a in attrs} == {0}
    assert {a[2] for a in attrs} == {1, 3} and {a[3] for a in attrs} == {1, 2}
    names = syn.class_names(8, palette)
    assert names[0] == "1.wingbars-tailband-spotted" and all("redcrown" not in n for n in names)
    spec = syn.sample_spec(opts, 5, "train", 0)
    assert spec.attributes == attrs[5]
    assert syn.marking_palette(SyntheticOptions()) == syn.FULL_PALETTE
    for bad, message in [
        ({"wing": ["wingbarz"]}, r"class_markings\.wing: unknown marking `wingbarz` \(markings: wingbars"),
        ({"beak": ["red"]}, r"class_markings: unknown part `beak`"),
        ({"tail": []}, r"class_markings\.tail: needs distinct markings"),
    ]:
        with pytest.raises(DatasetError, match=message):
            syn.marking_palette(SyntheticOptions(class_markings=bad))
    with pytest.raises(DatasetError, match=r"num_classes must be between 1 and 8"):
        syn.marking_counts(9, palette)


def test_marking_detail_scales_the_patterns_only() -> None:
    """marking_detail 0.5: twice as many wing bars along the wing; colour-region markings (red crown) unchanged."""
    u, v = np.meshgrid(np.linspace(-0.3, 0.2, 2001), np.linspace(-0.1, 0.1, 41))

    def runs(detail: float) -> int:  # bars crossed along the wing's axis (the middle row)
        mask, _ = syn._wing_marking(0, u, v, detail)
        row = mask[20].astype(int)
        return int((np.diff(row) == 1).sum())

    coarse, fine = runs(1.0), runs(0.5)
    assert coarse >= 4 and abs(fine - 2 * coarse) <= 1
    for m in (1, 2):  # spots and streaks on the breast get finer too
        a, _ = syn._body_marking(m, u, v + 0.15, 1.0)
        b, _ = syn._body_marking(m, u, v + 0.15, 0.5)
        assert not np.array_equal(a, b)
    crown, _ = syn._head_marking(0, u + 0.3, v - 0.1, 1.0)
    assert np.array_equal(crown, syn._head_marking(0, u + 0.3, v - 0.1, 0.4)[0])
    spec = syn.sample_spec(SyntheticOptions(marking_detail=0.5), 0, "train", 0)
    assert spec.detail == 0.5


def test_wing_streaks_are_the_bars_turned_a_quarter_turn() -> None:
    """wingstreaks: wingbars' bands along the wing's other axis. The same colour and the same share of the wing
    (blurred beyond resolution, the two wings look alike), but they alternate across the wing, not along it."""
    streaks_index = syn.MARKINGS["wing"].index("wingstreaks")
    u, v = np.meshgrid(np.linspace(-0.3, 0.2, 1001), np.linspace(-0.15, 0.15, 601))
    wing = syn.WING_SHAPE(u, v)
    for detail in (1.0, 0.22):
        bars, bars_colour = syn._wing_marking(0, u, v, detail)
        streaks, streaks_colour = syn._wing_marking(streaks_index, u, v, detail)
        assert np.array_equal(bars_colour, streaks_colour)
        share_bars, share_streaks = (bars & wing).sum() / wing.sum(), (streaks & wing).sum() / wing.sum()
        assert 0.3 < share_bars < 0.5 and abs(share_bars - share_streaks) < 0.03, (detail, share_bars, share_streaks)

    # sample the wing's own axes: `along` its long axis through its centre, `across` it
    t = np.linspace(-0.1, 0.1, 4001)
    cos, sin = math.cos(syn.WING_TILT), math.sin(syn.WING_TILT)

    def changes(m: int, along: np.ndarray, across: np.ndarray) -> int:
        du, dv = along * cos - across * sin, along * sin + across * cos
        mask, _ = syn._wing_marking(m, syn.WING_C[0] + du, syn.WING_C[1] + dv, 0.5)
        return int(np.abs(np.diff(mask.astype(int))).sum())

    zero = np.zeros_like(t)
    assert changes(0, t, zero) >= 8 and changes(0, zero + 0.001, t) == 0  # bars: cross the long axis
    assert changes(streaks_index, zero + 0.001, t) >= 8 and changes(streaks_index, t, zero) == 0  # streaks: run along it
    assert changes(0, t, zero) == changes(streaks_index, zero + 0.001, t)  # same period
    names = syn.class_names(8, syn.marking_palette(SyntheticOptions(class_markings={"wing": ["wingbars", "wingstreaks"]})))
    assert names[0] == "1.redcrown-wingbars-whitetip" and names[2] == "3.redcrown-wingstreaks-whitetip"


def test_coarse_colour_markings() -> None:
    """bluecrown: the red crown's region in blue; the plumage markings: the whole body (and the head and
    tail under their markings), in colours no distractor and no other marking uses: evidence a whole-image view reads."""
    u, v = np.meshgrid(np.linspace(-0.5, 0.55, 421), np.linspace(-0.3, 0.25, 221))
    red, red_colour = syn._head_marking(0, u, v)
    blue, blue_colour = syn._head_marking(syn.MARKINGS["head"].index("bluecrown"), u, v)
    assert np.array_equal(red, blue) and red.any() and not np.array_equal(red_colour, blue_colour)
    others = [*syn.OBJECT_COLOURS, *syn.MARK_COLOURS, syn.BEAK, syn.EYE, *syn.BACKGROUND]
    plumage = [n for n in syn.MARKINGS["body"] if n.endswith("plumage")]
    assert len(plumage) == 5 and sorted(syn.MARKINGS["body"].index(n) for n in plumage) == sorted(syn.PLUMAGE)
    for name in plumage:
        mask, colour = syn._body_marking(syn.MARKINGS["body"].index(name), u, v)
        assert mask.all()  # clipped to the body's shape when drawn
        rivals = others + [c for i, c in syn.PLUMAGE.items() if c is not colour]
        assert min(np.abs(colour - o).max() for o in rivals) >= 30, name
    assert min(np.abs(syn.BLUE - o).max() for o in others) >= 30

    # a plumage marking recolours the head and the tail too, under their own markings, and never the wing
    opts = SyntheticOptions(image_size=224, object_size=(0.5, 0.5), distractors=0)
    spec = syn.sample_spec(opts, 0, "test", 0)
    brown = syn.render(dataclasses.replace(spec, attributes=(0, 0, 0, 0)))
    grey = syn.render(dataclasses.replace(spec, attributes=(0, 0, 0, syn.MARKINGS["body"].index("greyplumage"))))
    changed = np.abs(grey.image.astype(int) - brown.image.astype(int)).max(axis=2) > 20
    only = {q: brown.part_masks[q] & ~np.logical_or.reduce([brown.part_masks[o] for o in syn.PARTS if o != q])
            for q in syn.PARTS}
    for q in syn.PLUMAGE_PARTS:
        assert changed[only[q]].mean() > 0.4, q
    assert changed[only["wing"]].mean() < 0.05


def test_classes_are_unique_marking_combinations() -> None:
    assert syn.marking_counts(8) == (2, 2, 2, 1)  # head, wing and tail vary; the body is the same for all
    for n in (2, 3, 8, 10, 27, SYNTHETIC_MAX_CLASSES):
        attrs = syn.class_attributes(n)
        assert len(set(attrs)) == n
        assert len(set(syn.class_names(n))) == n
    # with 8 classes every class has, for each part, a class that differs from it in that part only
    attrs = syn.class_attributes(8)
    for a in attrs:
        for p in range(3):
            assert sum(sum(x != y for x, y in zip(a, b)) == 1 and a[p] != b[p] for b in attrs) == 1
    with pytest.raises(DatasetError, match="num_classes"):
        syn.marking_counts(SYNTHETIC_MAX_CLASSES + 1)


def test_option_validation_names_the_key(tmp_path: Path) -> None:
    ds = {"kind": "synthetic", "root": str(tmp_path / "raw")}
    assert SyntheticOptions(num_classes=SYNTHETIC_MAX_CLASSES).num_classes == SYNTHETIC_MAX_CLASSES  # the bound is the palette's
    for bad, key in (({"num_classes": SYNTHETIC_MAX_CLASSES + 1}, "num_classes"), ({"object_size": [0.5, 0.9]}, "object_size"),
                     ({"max_rotation": -1.0}, "max_rotation")):
        path = write_params(tmp_path, {"syn": {**ds, "synthetic": bad}})
        with pytest.raises(ConfigError, match=rf"datasets\.syn\.synthetic\.?.*{key}"):
            load_params(path)


# --------------------------------------------------------------------------- prepare, end to end
def test_prepare_writes_a_manifest_with_boxes(tmp_path: Path) -> None:
    options = dataclasses.asdict(dataclasses.replace(TINY, train_per_class=4))
    options["object_size"] = list(options["object_size"])
    path = write_params(tmp_path, {"syn": {"kind": "synthetic", "root": str(tmp_path / "raw"), "val_fraction": 0.25,
                                           "synthetic": options}})
    settings = load_params(path)
    metrics = prepare.run(settings, "syn").metrics
    rows = read_manifest(tmp_path / "data" / "syn" / "manifest.csv")
    assert len(rows) == metrics["images"]["total"] == 3 * (4 + 2)
    assert metrics["with_box"] == len(rows) and metrics["boxes_clipped"] == 0
    assert {r.split for r in rows} == {"train", "val", "test"}
    assert [r.class_name for r in sorted(rows, key=lambda r: r.label)][0] == syn.class_names(3)[0]
    assert all(r.width == r.height == 64 and r.box is not None for r in rows)
    assert (tmp_path / "raw" / "synthetic.json").is_file()
