"""Heatmap methods against plain per-image computations, on a small model of the Stage1Net API."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fgpipe.attention import AOLM, BAP, METHODS, OAAM, GradCAM, create_method
from fgpipe.attention.aolm import aolm_region, box_indicator, previous_mask_on_grid
from fgpipe.errors import ConfigError
from fgpipe.localize import object_box
from fgpipe.models.base import Backbone


# --------------------------------------------------------------------------- a small model with the Stage1Net API
class HeadOutput(NamedTuple):
    logits: Tensor  # (B, K)
    embedding: Tensor  # (B, M*N)
    attention: Tensor  # (B, M, H, W)
    cam_logits: Tensor | None = None  # (B, K) GAP + linear


class TinyBackbone(Backbone):
    stage_names = ("s1", "s2")
    stage_channels = {"s1": 6, "s2": 8}
    stage_strides = {"s1": 2, "s2": 4}

    def __init__(self) -> None:
        super().__init__()
        self.s1 = nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.s2 = nn.Sequential(nn.Conv2d(6, 8, 3, 2, 1), nn.ReLU())

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        f1 = self.s1(x)
        return {"s1": f1, "s2": self.s2(f1)}


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

    def features(self, x: Tensor) -> dict[str, Tensor]:
        return self.backbone.forward_features(x)

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


# --------------------------------------------------------------------------- AOLM on hand-made activations
class FixedBackbone(Backbone):
    """Returns fixed stage outputs whatever the input (for hand-made activations)."""

    stage_names = ("s1", "s2")
    stage_channels = {"s1": 2, "s2": 2}
    stage_strides = {"s1": 5, "s2": 10}

    def __init__(self, stages: dict[str, Tensor]) -> None:
        super().__init__()
        self.stages = stages

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        return {k: v[: x.shape[0]] for k, v in self.stages.items()}


class FixedStage1(nn.Module):
    def __init__(self, stages: dict[str, Tensor]) -> None:
        super().__init__()
        self.backbone = FixedBackbone(stages)
        self.feature_layer = "s2"
        self.num_classes = 2

    def features(self, x: Tensor) -> dict[str, Tensor]:
        return self.backbone.forward_features(x)

    def head(self, feat: Tensor) -> HeadOutput:
        pooled = feat.mean(dim=(2, 3))  # (B, 2)
        return HeadOutput(pooled, pooled, feat)


def _split(total: np.ndarray) -> Tensor:
    """Two channels whose sum is ``total`` (h, w) -> (1, 2, h, w)."""
    t = torch.as_tensor(total, dtype=torch.float32)
    return torch.stack([0.25 * t, 0.75 * t])[None]


LAST = np.array(  # 4 x 6 channel sum of the last stage; mean 46/24: mask = the 2x2 block and the 2-cell bar
    [
        [9, 9, 0, 0, 0, 0],
        [9, 9, 0, 0, 5, 0],
        [0, 0, 0, 0, 5, 0],
        [0, 0, 0, 0, 0, 0],
    ],
    dtype=np.float64,
)


def _previous(cells: dict[tuple[int, int], int]) -> np.ndarray:
    """An 8 x 12 earlier-stage activation with ``n`` of the 4 fine cells of coarse cell (r, c) set to 1."""
    prev = np.zeros((8, 12))
    for (r, c), n in cells.items():
        for q in range(n):
            prev[2 * r + q // 2, 2 * c + q % 2] = 1.0
    return prev


def test_previous_mask_majority_resize() -> None:
    prev = _previous({(0, 0): 4, (0, 1): 2, (1, 0): 1, (3, 5): 3})
    got = previous_mask_on_grid(torch.as_tensor(prev)[None], (4, 6))[0].numpy()
    expected = np.zeros((4, 6), dtype=bool)
    expected[0, 0] = expected[0, 1] = expected[3, 5] = True  # 4/4, 2/4 and 3/4 in; 1/4 out
    np.testing.assert_array_equal(got, expected)


def test_aolm_region_cases() -> None:
    on = lambda *cells: np.isin(np.arange(24).reshape(4, 6), [r * 6 + c for r, c in cells])  # noqa: E731
    # largest component (the 2x2 block) intersected with the earlier mask
    np.testing.assert_array_equal(aolm_region(LAST, on((0, 0), (0, 1), (2, 4))), on((0, 0), (0, 1)))
    # empty intersection: the component alone
    np.testing.assert_array_equal(aolm_region(LAST, on((3, 0))), on((0, 0), (0, 1), (1, 0), (1, 1)))
    # constant activation: empty mask, empty region
    assert not aolm_region(np.ones((4, 6)), on((0, 0))).any()
    # ties by area: the component holding the max activation wins
    tie = np.zeros((4, 6))
    tie[0, 0:2] = 3.0
    tie[3, 4:6] = [3.0, 4.0]
    np.testing.assert_array_equal(aolm_region(tie, np.ones((4, 6), bool)), on((3, 4), (3, 5)))


def test_aolm_boxes_the_whole_intersection() -> None:
    region = np.zeros((4, 6), bool)
    region[1, 1] = region[2, 4] = True  # two pieces: the box spans both
    expected = np.zeros((4, 6))
    expected[1:3, 1:5] = 1
    np.testing.assert_array_equal(box_indicator(region), expected)
    assert not box_indicator(np.zeros((4, 6), bool)).any()


def test_aolm_method_end_to_end() -> None:
    prev_a = _previous({(0, 0): 4, (0, 1): 2, (1, 0): 1})
    prev_b = np.ones((8, 12))  # constant: everything is "not above the mean", intersection empty
    stages = {
        "s1": torch.cat([_split(prev_a), _split(prev_b), _split(prev_a)]),  # (3, 2, 8, 12)
        "s2": torch.cat([_split(LAST), _split(LAST), _split(np.ones((4, 6)))]),  # (3, 2, 4, 6)
    }
    model = FixedStage1(stages)
    out = AOLM(model)(torch.zeros(3, 3, 40, 60))
    assert AOLM(model).layer == "s2"
    expected = np.zeros((3, 4, 6), dtype=np.float32)
    expected[0, 0, 0:2] = 1  # block & earlier mask = the top row of the block
    expected[1, 0:2, 0:2] = 1  # no intersection: the block alone
    np.testing.assert_array_equal(out.heatmaps.numpy(), expected)  # image 2: empty mask, all zero
    # section 4's box logic gives AOLM's box (10-pixel cells on a 60 x 40 image), for any threshold
    for t in (0.2, 1.0):
        box, fallback = object_box(out.heatmaps[0], t, (60, 40))
        np.testing.assert_array_equal(box, [0, 0, 20, 10])
        assert not fallback
        box, fallback = object_box(out.heatmaps[2], t, (60, 40))
        np.testing.assert_array_equal(box, [0, 0, 60, 40])
        assert fallback


def test_aolm_needs_two_stages() -> None:
    model = FixedStage1({"s2": _split(LAST)})
    model.backbone.stage_names = ("s2",)
    with pytest.raises(ConfigError, match="at least two stages"):
        AOLM(model)
