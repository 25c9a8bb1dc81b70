"""Heatmap methods against plain per-image computations, on a small model of the Stage1Net API."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import measure
from torch import Tensor, nn

from fgpipe.attention import (
    AOLM,
    BAP,
    METHODS,
    OAAM,
    GradCAM,
    companion_methods,
    create_method,
    forward_pass,
    heatmaps_of,
)
from fgpipe.attention.aolm import aolm_region, box_indicator
from fgpipe.errors import ConfigError
from fgpipe.localize import object_box
from fgpipe.models import create_backbone
from fgpipe.models.base import PENULTIMATE_BLOCK, Backbone
from fgpipe.models.wsdan import Stage1Net


# --------------------------------------------------------------------------- a small model with the Stage1Net API
class HeadOutput(NamedTuple):
    logits: Tensor  # (B, K)
    embedding: Tensor  # (B, M*N)
    attention: Tensor  # (B, M, H, W)
    cam_logits: Tensor | None = None  # (B, K) GAP + linear


class TinyBackbone(Backbone):
    """Stage s1, then stage s2 of two blocks (a strided conv, then a 3x3 conv): AOLM reads both s2 blocks."""

    stage_names = ("s1", "s2")
    stage_channels = {"s1": 6, "s2": 8}
    stage_strides = {"s1": 2, "s2": 4}
    penultimate_block = "s2.0"

    def __init__(self) -> None:
        super().__init__()
        self.s1 = nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.s2 = nn.Sequential(
            nn.Sequential(nn.Conv2d(6, 8, 3, 2, 1), nn.ReLU()), nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU())
        )

    def forward_features(self, x: Tensor, penultimate: bool = False) -> dict[str, Tensor]:
        f1 = self.s1(x)
        mid = self.s2[0](f1)
        out = {"s1": f1, "s2": self.s2[1](mid)}
        if penultimate:
            out[PENULTIMATE_BLOCK] = mid
        return out


class TinyStage1(nn.Module):
    """Backbone + a WS-DAN-like head (attention, BAP, signed sqrt, L2, scaled linear)."""

    def __init__(self, num_classes: int = 5, m: int = 4, cam_head: bool = False) -> None:
        super().__init__()
        self.backbone = TinyBackbone()
        self.cam_conv = nn.Sequential(nn.Conv2d(8, 6, 1), nn.ReLU()) if cam_head else None
        self.cam_fc = nn.Linear(6, num_classes) if cam_head else None
        self.feature_layer = "s2"
        self.num_classes = num_classes
        self.att = nn.Sequential(nn.Conv2d(8, m, 1), nn.BatchNorm2d(m), nn.ReLU())
        self.fc = nn.Linear(m * 8, num_classes)
        for bn in (self.backbone.s1[1], self.att[1]):  # non-trivial eval-mode statistics
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
        self.att[0].bias.data.fill_(0.5)  # keep attention maps alive

    def features(self, x: Tensor, penultimate: bool = False) -> dict[str, Tensor]:
        return self.backbone.forward_features(x, penultimate)

    def head(self, feat: Tensor) -> HeadOutput:
        a = self.att(feat)  # (B, M, H, W)
        p = torch.einsum("bmhw,bnhw->bmn", a, feat) / (feat.shape[2] * feat.shape[3])  # (B, M, N)
        p = torch.sign(p) * torch.sqrt(p.abs() + 1e-12)
        emb = F.normalize(p.flatten(1), dim=1)  # (B, M*N)
        cam = self.cam_classify(self.cam_features(feat)) if self.cam_fc is not None else None
        return HeadOutput(self.fc(emb * 10.0), emb, a, cam)

    def cam_features(self, feat: Tensor) -> Tensor:
        return self.cam_conv(feat)

    def cam_classify(self, cam_feat: Tensor) -> Tensor:
        return self.cam_fc(cam_feat.mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> HeadOutput:
        return self.head(self.features(x)[self.feature_layer])


@pytest.fixture
def model() -> TinyStage1:
    torch.manual_seed(0)
    return TinyStage1().double().eval()


@pytest.fixture
def images() -> Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 32, 32, generator=g, dtype=torch.float64)


@pytest.fixture
def cam_model() -> TinyStage1:
    torch.manual_seed(0)
    return TinyStage1(cam_head=True).double().eval()


# --------------------------------------------------------------------------- plain per-image references
def _grad_per_image(model: TinyStage1, x: Tensor, target: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """A (K, H, W), dS_c/dA (K, H, W) through the *whole* model with grad, and the class c used."""
    feat = model.features(x[None])["s2"]  # non-leaf: the backbone runs with grad here
    logits = model.head(feat).logits[0]
    c = int(logits.argmax()) if target is None else target
    (g,) = torch.autograd.grad(logits[c], feat)
    return feat[0].detach().numpy(), g[0].numpy(), c


def gradcampp_reference(model: TinyStage1, x: Tensor, target: int | None = None) -> np.ndarray:
    a, g, _ = _grad_per_image(model, x, target)
    k_, h_, w_ = a.shape
    cam = np.zeros((h_, w_))
    for k in range(k_):
        sum_a = a[k].sum()
        w_k = 0.0
        for i in range(h_):
            for j in range(w_):
                gij = g[k, i, j]
                denom = 2 * gij**2 + sum_a * gij**3
                alpha = gij**2 / denom if denom != 0 else 0.0
                w_k += alpha * max(gij, 0.0)
        cam += w_k * a[k]
    return np.maximum(cam, 0.0)


def gradcam_reference(model: TinyStage1, x: Tensor, target: int | None = None) -> np.ndarray:
    a, g, _ = _grad_per_image(model, x, target)
    cam = sum(g[k].mean() * a[k] for k in range(a.shape[0]))
    return np.maximum(cam, 0.0)


def _normalise(m: np.ndarray) -> np.ndarray:
    return m / m.max() if m.max() > 0 else m


# --------------------------------------------------------------------------- gradient methods
@pytest.mark.parametrize(("cls", "reference"), [(OAAM, gradcampp_reference), (GradCAM, gradcam_reference)])
def test_cam_matches_per_image_autograd_loop(model, images, cls, reference) -> None:
    raw = cls(model, normalize=False)(images)
    out = cls(model)(images)
    assert out.heatmaps.shape == (6, 8, 8) and out.heatmaps.dtype == torch.float32
    assert torch.equal(out.predictions, out.logits.argmax(1))
    nonzero = 0
    for i in range(len(images)):
        ref = reference(model, images[i])
        np.testing.assert_allclose(raw.heatmaps[i].numpy(), ref, rtol=1e-5, atol=1e-6 * max(ref.max(), 1e-12))
        assert np.abs(out.heatmaps[i].numpy() - _normalise(ref)).max() <= 1e-5
        nonzero += ref.max() > 0
    assert nonzero >= 3  # the comparison is not vacuous


@pytest.mark.parametrize(("cls", "reference"), [(OAAM, gradcampp_reference), (GradCAM, gradcam_reference)])
def test_cam_of_given_targets(model, images, cls, reference) -> None:
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    out = cls(model)(images, targets)
    for i in range(len(images)):
        ref = _normalise(reference(model, images[i], int(targets[i])))
        assert np.abs(out.heatmaps[i].numpy() - ref).max() <= 1e-5


def test_oaam_of_the_cam_head_closed_form(cam_model, images) -> None:
    """Grad-CAM++ of a GAP + linear score in closed form: g_kij = w_ck / HW at every position, so one
    alpha_k per channel and w_k = HW * alpha_k * ReLU(g_k); L = ReLU(sum_k w_k A_k)."""
    out = OAAM(cam_model, normalize=False)(images)
    assert OAAM(cam_model).score == "cam"
    with torch.no_grad():
        cam_maps = cam_model.cam_conv(cam_model.features(images)["s2"])  # (B, K, H, W) the CAM head's last conv
        cls = cam_model.head(cam_model.features(images)["s2"]).cam_logits.argmax(1).numpy()
    feats = cam_maps.numpy()
    w = cam_model.cam_fc.weight.detach().numpy()  # (C, K)
    for b in range(len(images)):
        a, c = feats[b], int(cls[b])
        k_, h_, w_ = a.shape
        g = w[c] / (h_ * w_)  # (K,) the same at every position
        cam = np.zeros((h_, w_))
        for k in range(k_):
            denom = 2 * g[k] ** 2 + a[k].sum() * g[k] ** 3
            alpha = g[k] ** 2 / denom if denom != 0 else 0.0
            cam += (h_ * w_) * alpha * max(g[k], 0.0) * a[k]
        np.testing.assert_allclose(out.heatmaps[b].numpy(), np.maximum(cam, 0), rtol=1e-5, atol=1e-9)
    # the WS-DAN score gives another map; asking for the CAM head on a model without one is refused
    assert not torch.allclose(OAAM(cam_model, score="wsdan")(images).heatmaps, OAAM(cam_model)(images).heatmaps)
    plain = TinyStage1().double().eval()
    assert OAAM(plain).score == "wsdan"
    with pytest.raises(ConfigError, match=r"attention.score is `cam` but the stage-1 checkpoint has no CAM head"):
        OAAM(plain, score="cam")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_batched_equals_per_image(model, images, name) -> None:
    method = create_method(name, model)
    batch = method(images)
    for i in range(len(images)):
        one = method(images[i : i + 1])
        torch.testing.assert_close(batch.heatmaps[i], one.heatmaps[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(batch.logits[i], one.logits[0])
    peaks = batch.heatmaps.amax(dim=(1, 2))
    assert torch.all((peaks == 0) | (torch.abs(peaks - 1) < 1e-6))  # each map normalised by its max


def test_cam_in_float32_close_to_float64(images) -> None:
    torch.manual_seed(0)
    m32 = TinyStage1().eval()
    m64 = TinyStage1().double().eval()
    m64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in m32.state_dict().items()})
    h32 = OAAM(m32)(images.float()).heatmaps
    h64 = OAAM(m64)(images).heatmaps
    assert (h32 - h64).abs().max() <= 1e-4


def test_outer_no_grad_does_not_break_gradients(model, images) -> None:
    with torch.no_grad():
        out = GradCAM(model)(images[:2])
    ref = _normalise(gradcam_reference(model, images[0]))
    assert np.abs(out.heatmaps[0].numpy() - ref).max() <= 1e-5


def test_no_parameter_gradients_accumulate(model, images) -> None:
    OAAM(model)(images)
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- BAP
def test_bap_is_mean_of_attention_maps(model, images) -> None:
    out = BAP(model, normalize=False)(images)
    with torch.no_grad():
        maps = model(images).attention.numpy()  # (B, M, H, W)
    for i in range(len(images)):
        expected = sum(maps[i, m] for m in range(maps.shape[1])) / maps.shape[1]
        np.testing.assert_allclose(out.heatmaps[i].numpy(), expected, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- registry and errors
def test_registry_and_errors(model, images) -> None:
    assert set(METHODS) == {"oaam", "gradcam", "aolm", "bap"}
    assert isinstance(create_method("oaam", model), OAAM)
    with pytest.raises(ConfigError, match="allowed: aolm, bap, gradcam, oaam"):
        create_method("cam", model)
    with pytest.raises(ValueError, match="targets must be class indices"):
        OAAM(model)(images, torch.tensor([0, 1, 2, 3, 4, 5]))
    method = GradCAM(model)
    model.train()
    with pytest.raises(RuntimeError, match="training mode"):
        method(images)
    model.eval()
    model.feature_layer = "layer9"
    with pytest.raises(ConfigError, match="layer9"):
        GradCAM(model)


# --------------------------------------------------------------------------- the classifier explained is the one stored
def test_logits_are_those_of_the_classifier_explained(cam_model, images) -> None:
    """score cam: the logits (and predictions) returned are the CAM head's, the class OAAM explained."""
    out = OAAM(cam_model)(images)
    with torch.no_grad():
        head = cam_model(images)
    torch.testing.assert_close(out.logits, head.cam_logits.float())
    assert not torch.allclose(out.logits, head.logits.float())  # not the WS-DAN head's
    fp = forward_pass(cam_model, "cam", images, gradient=True)
    assert torch.equal(out.predictions, fp.targets)  # the class explained = the class stored as predicted
    explicit = OAAM(cam_model)(images, out.predictions)
    torch.testing.assert_close(explicit.heatmaps, out.heatmaps)
    for method in (BAP(cam_model), AOLM(cam_model), OAAM(cam_model, score="wsdan")):
        want = head.cam_logits if method.score == "cam" else head.logits
        torch.testing.assert_close(method(images).logits, want.float())  # the same for every method


# --------------------------------------------------------------------------- several methods, one pass
@pytest.mark.parametrize("which", ["model", "cam_model"])
def test_heatmaps_of_every_method_in_one_pass(which, request, images, monkeypatch) -> None:
    model = request.getfixturevalue(which)
    methods = companion_methods(create_method("gradcam", model))
    assert [m.name for m in methods] == ["oaam", "gradcam", "aolm", "bap"]  # registry order
    alone = {m.name: m(images) for m in methods}
    calls = {"features": 0, "grad": 0}
    features, grad = model.features, torch.autograd.grad

    def counting_features(*args, **kwargs):
        calls["features"] += 1
        return features(*args, **kwargs)

    def counting_grad(*args, **kwargs):
        calls["grad"] += 1
        return grad(*args, **kwargs)

    monkeypatch.setattr(model, "features", counting_features)
    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    together = heatmaps_of(methods, images)
    assert calls == {"features": 1, "grad": 1}  # one forward, and one backward shared by OAAM and Grad-CAM
    for name, out in alone.items():
        torch.testing.assert_close(together.heatmaps[name], out.heatmaps)
        torch.testing.assert_close(together.logits, out.logits)
    with pytest.raises(ValueError, match="another model or score"):
        heatmaps_of([OAAM(model, score="wsdan"), BAP(TinyStage1().double().eval())], images)


def test_plain_head_explains_its_own_classifier_and_has_no_bap() -> None:
    torch.manual_seed(0)
    model = Stage1Net(create_backbone("tiny"), num_classes=4, head="plain").eval()
    x = torch.randn(3, 3, 64, 64)
    out = OAAM(model)(x)
    assert OAAM(model).score == "cam"
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(x).logits)
    assert [m.name for m in companion_methods(OAAM(model))] == ["oaam", "gradcam", "aolm"]
    with pytest.raises(ConfigError, match="plain head"):
        BAP(model)


# --------------------------------------------------------------------------- AOLM against MMAL-Net's procedure
def aolm_reference(last: np.ndarray, pen: np.ndarray) -> np.ndarray:
    """MMAL-Net's AOLM written plainly (skimage label + regionprops, as its utils/AOLM.py) on one image's
    last-block (C, h, w) and penultimate-block (C, h, w) maps -> the box indicator (h, w); empty: all zero."""
    a = last.sum(axis=0)
    component_labels = measure.label(a > a.mean())  # default connectivity: 8 in 2-D
    areas = [prop.area for prop in measure.regionprops(component_labels)]
    out = np.zeros(a.shape)
    if not areas:  # MMAL-Net would fail here; the whole image, as for an empty intersection
        return out
    max_idx = areas.index(max(areas))
    a1 = pen.sum(axis=0)
    intersection = ((component_labels == (max_idx + 1)).astype(int) + (a1 > a1.mean()).astype(int)) == 2
    props = measure.regionprops(intersection.astype(int))
    if not props:  # MMAL-Net: bbox = the whole image
        return out
    r0, c0, r1, c1 = props[0].bbox
    out[r0:r1, c0:c1] = 1.0
    return out


class FixedBackbone(Backbone):
    """Returns fixed outputs whatever the input (for hand-made activations); ``pen`` is the block before the last."""

    stage_names = ("s1", "s2")
    stage_channels = {"s1": 3, "s2": 3}
    stage_strides = {"s1": 5, "s2": 10}
    penultimate_block = "s2.0"

    def __init__(self, last: Tensor, pen: Tensor) -> None:
        super().__init__()
        self.last, self.pen = last, pen

    def forward_features(self, x: Tensor, penultimate: bool = False) -> dict[str, Tensor]:
        n = x.shape[0]
        out = {"s1": torch.zeros(n, 3, 2 * self.last.shape[2], 2 * self.last.shape[3]), "s2": self.last[:n]}
        if penultimate:
            out[PENULTIMATE_BLOCK] = self.pen[:n]
        return out


class FixedStage1(nn.Module):
    def __init__(self, last: Tensor, pen: Tensor) -> None:
        super().__init__()
        self.backbone = FixedBackbone(last, pen)
        self.feature_layer = "s2"
        self.num_classes = 3
        self.cam_fc = None

    def features(self, x: Tensor, penultimate: bool = False) -> dict[str, Tensor]:
        return self.backbone.forward_features(x, penultimate)

    def head(self, feat: Tensor) -> HeadOutput:
        pooled = feat.mean(dim=(2, 3))  # (B, 3)
        return HeadOutput(pooled, pooled, feat)


def _aolm_of(last: np.ndarray, pen: np.ndarray) -> np.ndarray:
    model = FixedStage1(torch.as_tensor(last), torch.as_tensor(pen))
    return AOLM(model)(torch.zeros(len(last), 3, 8, 8)).heatmaps.numpy()


def test_aolm_matches_mmal_net_on_random_maps() -> None:
    rng = np.random.default_rng(0)
    # small integers: exact channel sums on both sides, and many ties between component areas
    last = rng.integers(0, 4, size=(60, 3, 6, 7)).astype(np.float64)
    pen = rng.integers(0, 4, size=(60, 3, 6, 7)).astype(np.float64)
    pen[::4] = 3 - last[::4]  # high where the last block is low: mostly an empty intersection
    got = _aolm_of(last, pen)
    expected = np.stack([aolm_reference(last[i], pen[i]) for i in range(len(last))])
    np.testing.assert_array_equal(got, expected)
    assert 0 < (got.reshape(60, -1).max(1) == 0).sum() < 60  # some empty intersections, not all
    assert (got.reshape(60, -1).sum(1) < 42).sum() >= 30  # and mostly real boxes, not the whole grid


def _channels(total: np.ndarray) -> np.ndarray:
    """Three channels whose sum is ``total`` (h, w) -> (1, 3, h, w)."""
    return np.stack([0.5 * total, 0.25 * total, 0.25 * total])[None]


LAST = np.array(  # channel sum of the last block; mean 45/24: mask = the 2x2 block (area 4) and a bar (area 2)
    [
        [9, 9, 0, 0, 0, 0],
        [9, 9, 0, 0, 4, 0],
        [0, 0, 0, 0, 5, 0],
        [0, 0, 0, 0, 0, 0],
    ],
    dtype=np.float64,
)


def _on(*cells: tuple[int, int]) -> np.ndarray:
    out = np.zeros((4, 6))
    for r, c in cells:
        out[r, c] = 1.0
    return out


@pytest.mark.parametrize(
    ("last", "pen", "box"),
    [
        # the largest component (the 2x2 block) intersected with the penultimate mask: its top row
        (LAST, _on((0, 0), (0, 1), (2, 4)), ((0, 0), (0, 1))),
        # the intersection splits into two pieces: the box spans both (regionprops of the whole intersection)
        (LAST, _on((0, 0), (1, 1), (2, 4)), ((0, 0), (1, 1))),
        # empty intersection: the whole image (MMAL-Net's [0, 0, 14, 14]), not the component alone
        (LAST, _on((3, 0), (2, 4)), None),
        # a constant last block: empty mask, the whole image
        (np.ones((4, 6)), _on((0, 0)), None),
        # equal areas: the first component in raster order wins, not the one holding the max
        (_on((0, 0), (0, 1)) * 3 + _on((3, 4)) * 3 + _on((3, 5)) * 4, np.ones((4, 6)) - _on((2, 2)), ((0, 0), (0, 1))),
    ],
)
def test_aolm_hand_made_cases(last: np.ndarray, pen: np.ndarray, box) -> None:
    got = _aolm_of(_channels(last), _channels(pen))[0]
    expected = np.zeros((4, 6))
    if box is not None:
        (r0, c0), (r1, c1) = box
        expected[r0 : r1 + 1, c0 : c1 + 1] = 1.0
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(aolm_reference(_channels(last)[0], _channels(pen)[0]), expected)
    # section 4's box logic gives AOLM's box (10-pixel cells on a 60 x 40 image) at any threshold;
    # the empty case is section 4's whole-image fallback
    for t in (0.05, 0.5, 1.0):
        found, fallback = object_box(got, t, (60, 40))
        if box is None:
            assert fallback and found.tolist() == [0, 0, 60, 40]
        else:
            (r0, c0), (r1, c1) = box
            assert not fallback and found.tolist() == [10 * c0, 10 * r0, 10 * (c1 + 1), 10 * (r1 + 1)]


def test_aolm_region_and_box_indicator() -> None:
    region = aolm_region(LAST, _on((0, 0), (1, 1), (2, 4)))
    np.testing.assert_array_equal(region, _on((0, 0), (1, 1)).astype(bool))
    expected = np.zeros((4, 6))
    expected[0:2, 0:2] = 1
    np.testing.assert_array_equal(box_indicator(region), expected)
    assert not box_indicator(np.zeros((4, 6), bool)).any()
    with pytest.raises(ValueError, match="same grid"):
        aolm_region(LAST, np.zeros((8, 12)))


def test_aolm_refuses_maps_on_two_grids_and_trunks_without_a_penultimate_block() -> None:
    model = FixedStage1(torch.ones(1, 3, 4, 6), torch.ones(1, 3, 8, 12))
    with pytest.raises(ConfigError, match="one grid"):
        AOLM(model)(torch.zeros(1, 3, 8, 8))
    model.backbone.penultimate_block = None
    with pytest.raises(ConfigError, match="no block before the last"):
        AOLM(model)
    assert "aolm" not in [m.name for m in companion_methods(BAP(model))]


# --------------------------------------------------------------------------- the penultimate block of the real trunks
@pytest.mark.parametrize(
    ("name", "block"),
    [("tiny", "layer3.0"), ("resnet18", "layer4.0"), ("resnet50", "layer4.1"), ("inception_v3", "Mixed_7b"),
     ("efficientnet_lite0", "_blocks.15")],
)
def test_penultimate_block_of_each_backbone(name: str, block: str) -> None:
    backbone = create_backbone(name)
    assert backbone.penultimate_block == block
    assert PENULTIMATE_BLOCK not in backbone.stage_names


def test_aolm_reads_the_penultimate_block_of_a_real_tiny_model() -> None:
    """Hooks on the tiny trunk's last two blocks (layer3.0 and layer3.1, each followed by its LCAM): AOLM's
    maps are exactly theirs, and its heatmaps MMAL-Net's procedure on them."""
    torch.manual_seed(0)
    model = Stage1Net(create_backbone("tiny", lcam="block"), num_classes=3, num_attentions=4).eval()
    seen: dict[str, Tensor] = {}
    hooks = [
        model.backbone.lcam[key].register_forward_hook(lambda _m, _i, out, key=key: seen.__setitem__(key, out.detach()))
        for key in ("layer2_1", "layer3_0", "layer3_1")
    ]
    x = torch.randn(8, 3, 64, 64)
    fp = forward_pass(model, "wsdan", x, penultimate=True)
    assert torch.equal(fp.features[PENULTIMATE_BLOCK], seen["layer3_0"])  # layer3.0: the block before the last
    assert torch.equal(fp.features["layer3"], seen["layer3_1"])
    assert not torch.equal(seen["layer3_0"], seen["layer3_1"])
    heat = AOLM(model)(x).heatmaps.numpy()
    for h in hooks:
        h.remove()
    last, pen = seen["layer3_1"].double().numpy(), seen["layer3_0"].double().numpy()
    expected = np.stack([aolm_reference(last[i], pen[i]) for i in range(len(x))])
    np.testing.assert_array_equal(heat, expected)
    # the previous stage (layer2, stride 8) is neither what AOLM reads nor on its grid
    assert seen["layer2_1"].shape[-2:] != seen["layer3_0"].shape[-2:]


def test_efficientnet_penultimate_block_is_the_last_mbconv() -> None:
    backbone = create_backbone("efficientnet_lite0").eval()
    with torch.no_grad():
        feats = backbone.forward_features(torch.randn(1, 3, 64, 64), penultimate=True)
    # _blocks.15 closes stage5; the head conv (the last block) reads it
    assert torch.equal(feats[PENULTIMATE_BLOCK], feats["stage5"])
    assert feats[PENULTIMATE_BLOCK].shape[-2:] == feats["head"].shape[-2:]


# --------------------------------------------------------------------------- test-time mirroring
def test_flip_averages_each_map_with_the_mirrored_images_map_of_the_same_class(model, images) -> None:
    """``flip``: mean of the normalised map of x and the mirrored-back map of mirror(x), explaining x's class."""
    methods = [create_method(name, model) for name in ("oaam", "gradcam", "bap")]
    plain = heatmaps_of(methods, images)
    out = heatmaps_of(methods, images, flip=True)
    torch.testing.assert_close(out.logits, plain.logits)  # the classification is the unmirrored pass's
    mirrored = images.flip(-1)
    for method in methods:
        for i in range(len(images)):
            c = int(plain.predictions[i])
            a = _normalise(method(images[i : i + 1], torch.tensor([c])).heatmaps[0].numpy())
            b = _normalise(method(mirrored[i : i + 1], torch.tensor([c])).heatmaps[0].numpy())[:, ::-1]
            np.testing.assert_allclose(out.heatmaps[method.name][i].numpy(), _normalise((a + b) / 2), rtol=1e-5, atol=1e-6)
    # a mirrored image gives a different map (the check above is not trivially about symmetric maps)
    assert not torch.allclose(out.heatmaps["oaam"], plain.heatmaps["oaam"])


def test_flip_leaves_aolm_as_mmal_net_defines_it() -> None:
    torch.manual_seed(0)
    net = Stage1Net(create_backbone("tiny"), num_classes=3, head="plain").eval()
    x = torch.randn(4, 3, 64, 64)
    aolm, oaam = create_method("aolm", net), create_method("oaam", net)
    torch.testing.assert_close(heatmaps_of([aolm, oaam], x, flip=True).heatmaps["aolm"], aolm(x).heatmaps)
    torch.testing.assert_close(aolm(x, flip=True).heatmaps, aolm(x).heatmaps)
