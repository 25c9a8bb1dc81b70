"""params.yaml loading: the real file loads; bad keys, types, ranges and run entries name the key path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from conftest import write_fake_cub, write_params

from fgpipe.config import AircraftOptions, load_params
from fgpipe.errors import ConfigError
from fgpipe.manifest import read_manifest
from fgpipe.stages import prepare
from fgpipe.store import read_json

REAL_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def test_real_params_load() -> None:
    settings = load_params(REAL_PARAMS)
    p = settings.params
    assert {"synthetic", "cub", "aircraft", "cars"} <= set(p.datasets)
    assert p.datasets["cub"].kind == "cub" and p.datasets["cars"].kind == "cars"
    air = p.datasets["aircraft"].options()
    assert isinstance(air, AircraftOptions) and air.annotation_level in ("variant", "family", "manufacturer")
    for name in p.run:  # every dataset dvc runs is declared, so `fgpipe prepare -d NAME` resolves it
        assert settings.dataset(name).kind
    assert settings.base_dir == REAL_PARAMS.parent and settings.overrides == {}


def test_real_params_shrunk_to_a_fake_cub(tmp_path: Path) -> None:
    """The real params.yaml, pointed by CLI-style overrides at a tiny CUB and a scratch output folder."""
    root = tmp_path / "CUB_200_2011"
    write_fake_cub(root)
    overrides = {
        "datasets.cub.root": str(root),
        "prepare.data_dir": str(tmp_path / "data"),
        "prepare.metrics_dir": str(tmp_path / "metrics"),
    }
    settings = load_params(REAL_PARAMS, overrides)
    record = prepare.run(settings, "cub")
    # the provenance record names paths from the project root (the params file's folder), never absolute
    relative = {key: os.path.relpath(value, REAL_PARAMS.resolve().parent) for key, value in overrides.items()}
    assert record.metrics["images"]["total"] == 18 and record.provenance["overrides"] == relative
    assert read_json(tmp_path / "metrics/cub/prepare.json") == record.metrics
    assert read_json(tmp_path / "metrics/cub/prepare.provenance.json") == record.provenance
    assert read_json(tmp_path / "data/cub/dataset.json")["overrides"] == overrides
    assert len(read_manifest(tmp_path / "data/cub/manifest.csv")) == 18


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _base() -> dict:
    return {"run": {}, "datasets": {"birds": {"kind": "cub", "root": "raw/cub"}}}


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda r: r["datasets"]["birds"].update(val_fractoin=0.1), r"datasets\.birds\.val_fractoin: unknown key \(allowed: .*val_fraction"),
        (lambda r: r.update(trian_backbone={}), r"trian_backbone: unknown key \(allowed: run, datasets, preset, prepare"),
        (lambda r: r["datasets"]["birds"].update(val_fraction="0.1"), r"datasets\.birds\.val_fraction: .*\(got '0\.1'\)"),
        (lambda r: r["datasets"]["birds"].update(skip_bad=1), r"datasets\.birds\.skip_bad: .*bool"),
        (lambda r: r["datasets"]["birds"].update(val_fraction=1.5), r"datasets\.birds\.val_fraction: .*less than 1"),
        (lambda r: r["datasets"]["birds"].update(split_seed=-1), r"datasets\.birds\.split_seed: .*greater than or equal to 0"),
        (lambda r: r["datasets"]["birds"].update(kind="dogs"), r"datasets\.birds\.kind: .*'cub'"),
        (lambda r: r["datasets"]["birds"].update(kind="aircraft", aircraft={"annotation_level": "model"}),
         r"datasets\.birds\.aircraft\.annotation_level: .*'variant'"),
        (lambda r: r["datasets"]["birds"].update(aircraft={}), r"option block `aircraft` is only allowed with kind: aircraft"),
        (lambda r: r["datasets"]["birds"].pop("root"), r"datasets\.birds\.root: required key is missing"),
        (lambda r: r["run"].update(birds="raw/elsewhere"), r"run\.birds must be `raw/cub`"),
        (lambda r: r["run"].update(dogs="raw/dogs"), r"run\.dogs: no such dataset under `datasets` \(known: birds\)"),
        (lambda r: r.update(prepare={"data_dir": 3}), r"prepare\.data_dir: .*string"),
    ],
)
def test_invalid_params_name_the_key(tmp_path: Path, edit, pattern: str) -> None:
    raw = _base()
    edit(raw)
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError, match=pattern) as exc:
        load_params(path)
    assert str(exc.value).startswith(f"{path}: 1 invalid setting")


def test_run_entry_matching_root_accepted(tmp_path: Path) -> None:
    raw = _base()
    raw["run"] = {"birds": "raw/./cub"}  # the same path, spelled differently
    assert load_params(_write(tmp_path, raw)).params.run == {"birds": "raw/./cub"}


def test_overrides_validated_and_recorded(tmp_path: Path) -> None:
    path = _write(tmp_path, _base())
    with pytest.raises(ConfigError, match=r"datasets\.birds\.val_fraction: .*less than 1"):
        load_params(path, {"datasets.birds.val_fraction": 3.0})
    with pytest.raises(ConfigError, match=r"cannot override `datasets\.birds\.root\.x`: `root` is not a section"):
        load_params(path, {"datasets.birds.root.x": 1})
    settings = load_params(path, {"datasets.birds.root": "/data/cub", "datasets.birds.download": None})
    assert settings.overrides == {"datasets.birds.root": "/data/cub"}  # unset CLI options are not recorded
    assert settings.dataset_root("birds") == Path("/data/cub")
    assert settings.provenance() == {
        "params_file": str(path), "preset": "none", "overrides": {"datasets.birds.root": "/data/cub"}, "per_dataset": {}
    }


def test_a_stage_record_keeps_figures_apart_and_names_paths_from_the_project(tmp_path: Path) -> None:
    """Settings.record: the figures as given; the provenance after the dataset, with the params file's name and every
    absolute path (a Path, an override, a string) relative to the project root; relative strings as given."""
    path = _write(tmp_path, _base())
    settings = load_params(path, {"datasets.birds.root": str(tmp_path / "elsewhere" / "cub")})
    figures = {"top1": 0.5, "val": {"top1": None, "images": 3}, "fallback": False}
    record = settings.record("birds", figures, {
        "checkpoint": tmp_path / "data/birds/stage1/best.pt", "device": "cpu", "weights": "models/w.pt", "other": "/opt/w.pt",
    })
    assert record.metrics == figures
    assert record.provenance == {
        "dataset": "birds", "checkpoint": "data/birds/stage1/best.pt", "device": "cpu", "weights": "models/w.pt",
        "other": os.path.relpath("/opt/w.pt", tmp_path.resolve()), "params_file": "params.yaml", "preset": "none",
        "overrides": {"datasets.birds.root": "elsewhere/cub"}, "per_dataset": {},
    }
    for bad, key in (({"device": "cpu"}, "device"), ({"heatmap_size": [10, 10]}, "heatmap_size"), ({"val": {"path": tmp_path}}, "val.path")):
        with pytest.raises(TypeError, match=rf"only figures .*not {key}: put them in the provenance"):
            settings.record("birds", bad, {})


def test_missing_file_and_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"params file not found: .*nope\.yaml"):
        load_params(tmp_path / "nope.yaml")
    settings = load_params(write_params(tmp_path, {"birds": {"kind": "cub", "root": "raw"}}))
    with pytest.raises(ConfigError, match=r"no dataset `dogs` under `datasets` \(known: birds\)"):
        settings.dataset("dogs")
    assert settings.dataset_root("birds") == tmp_path / "raw"  # relative to the params file's folder


# --------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", ["paper-resnet50", "paper-inception-v3"])
def test_paper_presets_load_over_the_real_params(name: str) -> None:
    """Each bundled preset is valid and sets the published configuration (METHODS.md section 7)."""
    from fgpipe.config import preset_names

    assert name in preset_names()
    p = load_params(REAL_PARAMS, {"preset": name}).params
    assert p.preset == name
    assert p.model.backbone == {"paper-resnet50": "resnet50", "paper-inception-v3": "inception_v3"}[name]
    assert p.model.weights == "imagenet" and p.model.num_attentions == 32
    for t in (p.train_backbone, p.train_refine):
        assert (t.input_size, t.batch_size, t.epochs, t.optimizer, t.lr, t.momentum) == (448, 12, 80, "sgd", 0.001, 0.9)
    assert p.attention.method == "oaam" and p.crops.threshold == 0.2 and p.crops.part_sizes == (96, 160, 224)
    assert p.datasets == load_params(REAL_PARAMS).params.datasets  # datasets and run stay the project's


def test_preset_file_merges_and_cli_overrides_win(tmp_path: Path) -> None:
    raw = _base()
    raw["train_backbone"] = {"epochs": 3, "lr": 0.5, "augment": {"hflip": False, "color_jitter": 0.1}}
    raw["preset"] = "mine.yaml"
    (tmp_path / "mine.yaml").write_text(
        "description: a test preset\ntrain_backbone: {lr: 0.002, augment: {hflip: true}}\ncrops: {threshold: 0.3}\n"
    )
    path = _write(tmp_path, raw)
    p = load_params(path).params
    assert p.train_backbone.lr == 0.002 and p.train_backbone.epochs == 3  # set by the preset / kept from the file
    assert p.train_backbone.augment.hflip is True and p.train_backbone.augment.color_jitter == 0.1  # nested merge
    assert p.crops.threshold == 0.3
    assert load_params(path, {"crops.threshold": 0.4}).params.crops.threshold == 0.4  # an explicit override wins
    assert load_params(path, {"preset": "none"}).params.train_backbone.lr == 0.5  # --preset none turns it off


def test_preset_errors_name_the_culprit(tmp_path: Path) -> None:
    path = _write(tmp_path, _base())
    with pytest.raises(ConfigError, match=r"unknown preset `paper-vgg` \(bundled: paper-inception-v3, paper-resnet50"):
        load_params(path, {"preset": "paper-vgg"})
    (tmp_path / "bad.yaml").write_text("datasets: {birds: {kind: cub, root: elsewhere}}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: a preset may set only model, .*; not datasets"):
        load_params(path, {"preset": "bad.yaml"})
    (tmp_path / "typo.yaml").write_text("train_backbone: {learning_rate: 0.1}\n")
    with pytest.raises(ConfigError, match=r"train_backbone\.learning_rate: unknown key"):
        load_params(path, {"preset": "typo.yaml"})


# --------------------------------------------------------------------------- per-dataset parameters
REPO = REAL_PARAMS.parent


def _two_datasets(**blocks: dict) -> dict:
    """Two datasets sharing a train_backbone section; ``blocks`` is per_dataset.birds."""
    return {
        "run": {},
        "datasets": {"birds": {"kind": "cub", "root": "raw/cub"}, "toy": {"kind": "synthetic", "root": "raw/toy"}},
        "train_backbone": {"input_size": 160, "epochs": 3, "lr": 0.5, "augment": {"hflip": True, "color_jitter": 0.3}},
        "crops": {"threshold": 0.4},
        "per_dataset": {"birds": blocks, "toy": {"crops": {}}},
    }


def test_per_dataset_blocks_merge_for_their_dataset_only(tmp_path: Path) -> None:
    blocks = {"train_backbone": {"input_size": 224, "epochs": 12, "augment": {"hflip": False}}, "crops": {"threshold": 0.2}}
    path = _write(tmp_path, _two_datasets(**blocks))
    birds = load_params(path, dataset="birds")
    tb = birds.params.train_backbone
    assert (tb.input_size, tb.epochs, tb.lr) == (224, 12, 0.5)  # the dataset's values; lr kept from the file
    assert tb.augment.hflip is False and tb.augment.color_jitter == 0.3  # a nested key, its siblings kept
    assert birds.params.crops.threshold == 0.2 and birds.dataset_name == "birds"
    assert birds.provenance()["per_dataset"] == blocks and birds.dataset_overrides() == blocks
    for other in (load_params(path, dataset="toy"), load_params(path), load_params(path).for_dataset("toy")):
        assert (other.params.train_backbone.input_size, other.params.train_backbone.epochs) == (160, 3)
        assert other.params.train_backbone.augment.hflip is True and other.params.crops.threshold == 0.4
        assert other.provenance()["per_dataset"] == {}
    assert load_params(path).for_dataset("birds").params == birds.params
    with pytest.raises(ConfigError, match=r"no dataset `dogs` under `datasets` \(known: birds, toy\)"):
        load_params(path, dataset="dogs")
    with pytest.raises(ConfigError, match=r"these settings hold dataset `birds`'s parameters, not `toy`'s"):
        birds.dataset("toy")  # a stage handed another dataset's settings stops instead of using the wrong values


def test_per_dataset_precedence_file_dataset_preset_cli(tmp_path: Path) -> None:
    """params.yaml < per_dataset.NAME < preset < CLI options: the preset wins over the dataset's block."""
    raw = _two_datasets(train_backbone={"epochs": 12, "lr": 0.1, "batch_size": 8}, crops={"threshold": 0.2})
    (tmp_path / "mine.yaml").write_text("train_backbone: {lr: 0.002, batch_size: 4}\n")
    path = _write(tmp_path, raw)
    tb = load_params(path, dataset="birds").params.train_backbone
    assert (tb.epochs, tb.lr, tb.batch_size) == (12, 0.1, 8)  # no preset: the dataset's values over the file's
    p = load_params(path, {"preset": "mine.yaml"}, dataset="birds").params
    assert (p.train_backbone.epochs, p.train_backbone.lr, p.train_backbone.batch_size) == (12, 0.002, 4)  # preset wins
    assert p.crops.threshold == 0.2  # a key the preset leaves alone keeps the dataset's value
    p = load_params(path, {"preset": "mine.yaml", "train_backbone.lr": 0.03, "crops.threshold": 0.5}, dataset="birds").params
    assert (p.train_backbone.lr, p.train_backbone.epochs, p.crops.threshold) == (0.03, 12, 0.5)  # CLI wins over all
    assert load_params(path, {"preset": "mine.yaml"}, dataset="toy").params.train_backbone.epochs == 3  # toy: the file's


@pytest.mark.parametrize(
    "blocks, pattern",
    [
        ({"train_backbone": {"epochs": 0}},
         r"per_dataset\.birds\.train_backbone\.epochs: Input should be greater than or equal to 1 \(got 0\)"),
        ({"train_backbone": {"epoch": 3}}, r"per_dataset\.birds\.train_backbone\.epoch: unknown key \(allowed: input_size, epochs"),
        ({"train_backbone": {"augment": {"hflpi": False}}},
         r"per_dataset\.birds\.train_backbone\.augment\.hflpi: unknown key \(allowed: resize_ratio, hflip, color_jitter\)"),
        ({"train_backbone": {"augment": {"hflip": 1}}}, r"per_dataset\.birds\.train_backbone\.augment\.hflip: .*bool"),
        ({"attention": {"batch_size": "32"}}, r"per_dataset\.birds\.attention\.batch_size: .*integer \(got '32'\)"),
        ({"model": {"lcam": "everywhere"}}, r"per_dataset\.birds\.model\.lcam: .*'block'"),
        ({"train_backbone": {"crop_threshold": [0.7, 0.2]}}, r"per_dataset\.birds\.train_backbone: crop_threshold must satisfy"),
        ({"trian_backbone": {"epochs": 3}},
         r"per_dataset\.birds\.trian_backbone: unknown key \(allowed: model, train_backbone, attention, crops, train_refine, evaluate\)"),
        ({"prepare": {"data_dir": "x"}}, r"per_dataset\.birds\.prepare: unknown key"),
        ({"crops": 0.2}, r"per_dataset\.birds\.crops: Input should be an object \(got 0\.2\)"),
    ],
)
def test_per_dataset_errors_name_the_full_key_whichever_dataset_runs(tmp_path: Path, blocks: dict, pattern: str) -> None:
    path = _write(tmp_path, _two_datasets(**blocks))
    for dataset in ("birds", "toy", None):  # a typo in birds' block stops a run on toy too
        with pytest.raises(ConfigError, match=pattern) as exc:
            load_params(path, dataset=dataset)
        assert str(exc.value).startswith(f"{path}: 1 invalid setting")


def test_per_dataset_checked_even_where_a_preset_hides_it(tmp_path: Path) -> None:
    raw = _two_datasets(train_backbone={"lr": 50.0})  # out of range, though the preset sets lr
    (tmp_path / "mine.yaml").write_text("train_backbone: {lr: 0.002}\n")
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError, match=r"per_dataset\.birds\.train_backbone\.lr: Input should be less than or equal to 10"):
        load_params(path, {"preset": "mine.yaml"}, dataset="toy")


def test_per_dataset_unknown_dataset(tmp_path: Path) -> None:
    raw = _two_datasets()
    raw["per_dataset"]["dogs"] = {"crops": {}}
    with pytest.raises(ConfigError, match=r"per_dataset\.dogs: no such dataset under `datasets` \(known: birds, toy\)"):
        load_params(_write(tmp_path, raw))


def test_real_params_have_every_per_dataset_block() -> None:
    """dvc.yaml tracks per_dataset.NAME.SECTION and DVC fails on a missing key: every dataset of params.yaml
    carries all six blocks, so adding it under `run` (or `-S '+run.NAME=...'`) works."""
    from fgpipe.config import STAGE_SECTIONS

    raw = yaml.safe_load(REAL_PARAMS.read_text())
    assert set(raw["per_dataset"]) == set(raw["datasets"])
    for name, blocks in raw["per_dataset"].items():
        assert set(blocks) == set(STAGE_SECTIONS), name
        assert all(isinstance(v, dict) for v in blocks.values()), name


def test_dvc_yaml_tracks_each_stages_per_dataset_blocks() -> None:
    """Every stage lists per_dataset.${key}.SECTION for exactly the stage sections it reads (those it lists and
    those its module reads), so a dataset's change reruns its own stages; prepare tracks no per_dataset key."""
    import re

    from fgpipe.config import PRESET_SECTIONS, STAGE_SECTIONS

    assert PRESET_SECTIONS == STAGE_SECTIONS
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    covered: set[str] = set()
    for stage, spec in stages.items():
        params = [k for k in spec["do"]["params"] if isinstance(k, str)]
        module = (REPO / "fgpipe/stages" / f"{stage.replace('-', '_')}.py").read_text()
        reads = set(re.findall(r"params\.(\w+)", module)) & set(STAGE_SECTIONS)
        shared = {k for k in params if k in STAGE_SECTIONS}
        own = {k.removeprefix("per_dataset.${key}.") for k in params if k.startswith("per_dataset.")}
        assert reads <= shared, f"{stage} reads {sorted(reads - shared)} but dvc.yaml does not track them"
        assert own == shared, f"{stage}: per_dataset.${{key}} lists {sorted(own)}, shared sections {sorted(shared)}"
        assert all(k.startswith("per_dataset.${key}.") for k in params if k.startswith("per_dataset")), stage
        assert not any("per_dataset".startswith(k) for k in params), stage  # nothing that holds every block
        covered |= own
    assert not any(k.startswith("per_dataset") for k in stages["prepare"]["do"]["params"])
    assert covered == set(STAGE_SECTIONS)


REAL_TEXT = (Path(__file__).resolve().parents[1] / "params.yaml").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (REAL_TEXT + "\ntrain_backbone:\n  epochs: 1\n", r"key `train_backbone` is given twice"),  # a section twice
        (REAL_TEXT.replace("  epochs: 12", "  epochs: 12\n  epochs: 3", 1), r"key `epochs` is given twice"),
        (
            "a: &a [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]\n"
            + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh"))
            + REAL_TEXT,
            r"aliases \(\*name\) expand to more than 1,000,000 values",  # 10**8 values: refused unexpanded
        ),
    ],
    ids=["section-twice", "key-twice", "alias-bomb"],
)
def test_params_yaml_refuses_duplicate_keys_and_aliases(tmp_path: Path, text: str, pattern: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=pattern) as err:
        load_params(path)
    assert str(path) in str(err.value) and "<unicode string>" not in str(err.value)  # the file (and the line)


def test_params_yaml_benign_aliases_load(tmp_path: Path) -> None:
    """A dict shared by two sections (what yaml.safe_dump writes as an anchor and an alias) loads as written."""
    params = yaml.safe_load(REAL_TEXT)
    shared = {"resize_ratio": 1.2, "hflip": True, "color_jitter": 0.0}
    params["train_backbone"]["augment"] = shared
    params["train_refine"]["augment"] = shared
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    assert "*id001" in path.read_text()
    settings = load_params(path)
    assert settings.params.train_refine.augment.resize_ratio == 1.2


def test_params_yaml_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_bytes(REAL_TEXT.encode() + b"\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text .*\\xe9.*save it as UTF-8"):
        load_params(path)


@pytest.mark.parametrize("name", ["x/../cub", "../evil", "a/b", "..", ".hidden", ""])
def test_dataset_names_are_folder_names(tmp_path: Path, name: str) -> None:
    params = yaml.safe_load(REAL_TEXT)
    params["datasets"][name] = dict(params["datasets"]["cub"])
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    with pytest.raises(ConfigError, match="a dataset name is a folder name"):
        load_params(path)


def test_weight_step_has_a_floor(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"evaluate.weight_step: .*greater than or equal to 0.01"):
        load_params(Path(__file__).resolve().parents[1] / "params.yaml", {"evaluate.weight_step": 1e-6})
