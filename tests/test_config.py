"""params.yaml loading: the real file loads; bad keys, types, ranges and run entries name the key path."""

from __future__ import annotations

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
    metrics = prepare.run(settings, "cub")
    assert metrics["images"]["total"] == 18 and metrics["overrides"] == overrides
    assert read_json(tmp_path / "metrics/cub/prepare.json")["overrides"] == overrides
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
    assert settings.provenance() == {"params_file": str(path), "preset": "none", "overrides": {"datasets.birds.root": "/data/cub"}}


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
