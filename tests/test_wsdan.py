"""WS-DAN head (METHODS.md section 2): BAP, center loss, attention crop/drop, refinement, against plain loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fgpipe.errors import ConfigError
from fgpipe.models import (
    CenterLoss,
    HeadOutput,
    Stage1Net,
    attention_box,
    attention_crop_drop,
    bap,
    create_backbone,
    refine_crop,
)
from fgpipe.models.wsdan import (
    attention_boxes,
    crop_resize,
    drop_images,
    select_attention_maps,
    selection_probabilities,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- BAP
def bap_loop(A: torch.Tensor, Fm: torch.Tensor) -> torch.Tensor:
    """BAP written out: P[m, n] = sum_hw A*F / (H*W), signed sqrt, divide by the L2 norm."""
    B, M, H, W = A.shape
    N = Fm.shape[1]
    out = torch.zeros(B, M * N, dtype=torch.float64)
    for b in range(B):
        v = []
        for m in range(M):
            for n in range(N):
                p = sum(float(A[b, m, i, j]) * float(Fm[b, n, i, j]) for i in range(H) for j in range(W)) / (H * W)
                v.append(math.copysign(math.sqrt(abs(p) + 1e-12), p) if p != 0 else 0.0)
        norm = math.sqrt(sum(t * t for t in v))
        out[b] = torch.tensor([t / norm for t in v], dtype=torch.float64)
    return out


def test_bap_matches_loop() -> None:
    torch.manual_seed(0)
    A = torch.rand(2, 3, 3, 5, dtype=torch.float64)
    Fm = torch.randn(2, 4, 3, 5, dtype=torch.float64)  # negative entries: the signed sqrt keeps the sign
    got = bap(A, Fm)
    assert got.shape == (2, 12)
    torch.testing.assert_close(got.double(), bap_loop(A, Fm), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(2), rtol=0, atol=1e-5)
    # layout: entry m*N + n belongs to attention map m and channel n
    A2 = torch.zeros_like(A)
    A2[:, 1] = A[:, 1]
    nonzero = (bap(A2, Fm).abs() > 1e-4).nonzero()[:, 1].unique()
    assert nonzero.tolist() == [4, 5, 6, 7]


def test_bap_all_zero_attention_gives_zero_not_nan() -> None:
    out = bap(torch.zeros(1, 2, 3, 3), torch.randn(1, 4, 3, 3))
    assert torch.isfinite(out).all() and out.abs().max() < 1e-5


# --------------------------------------------------------------------------- Stage1Net
def test_stage1net_head_and_feature_layer() -> None:
    torch.manual_seed(0)
    net = Stage1Net(create_backbone("tiny"), num_classes=5, num_attentions=6, logit_scale=100.0).eval()
    assert net.feature_layer == "layer3" and net.num_classes == 5 and net.embedding_dim == 6 * 64
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = net(x)
        assert isinstance(out, HeadOutput)
        assert out.logits.shape == (2, 5) and out.embedding.shape == (2, 6 * 64) and out.attention.shape == (2, 6, 4, 4)
        assert (out.attention >= 0).all()
        # logits = fc(100 * embedding); embedding = BAP(attention, feature layer)
        feat = net.features(x)["layer3"]
        torch.testing.assert_close(out.embedding, bap(out.attention, feat))
        torch.testing.assert_close(out.logits, out.embedding @ net.fc.weight.T * 100.0, rtol=1e-4, atol=1e-4)
        a = F.relu(net.attention[1](F.conv2d(feat, net.attention[0].weight)))
        torch.testing.assert_close(out.attention, a)

    mid = Stage1Net(create_backbone("tiny"), num_classes=3, num_attentions=4, feature_layer="layer2")
    assert mid.feature_layer == "layer2" and mid.embedding_dim == 4 * 32
    assert mid(x).attention.shape == (2, 4, 8, 8)
    with pytest.raises(ConfigError, match="layer1, layer2, layer3"):
        Stage1Net(create_backbone("tiny"), num_classes=3, feature_layer="layer9")


def test_cam_head_is_conv_bn_relu_gap_linear() -> None:
    """The CAM head: maps = ReLU(BN(W1 F)) written out per position, logits = W2 mean_hw(maps) + b; none -> None."""
    torch.manual_seed(0)
    net = Stage1Net(create_backbone("tiny"), num_classes=4, num_attentions=3, cam_channels=5).eval()
    bn = net.cam_conv[1]
    bn.running_mean.uniform_(-0.3, 0.3)
    bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = net(x)
        feat = net.features(x)[net.feature_layer]  # (2, 64, 4, 4)
    assert out.cam_logits is not None and out.cam_logits.shape == (2, 4)
    w1 = net.cam_conv[0].weight.detach()[:, :, 0, 0]  # (5, 64)
    w2, b2 = net.cam_fc.weight.detach(), net.cam_fc.bias.detach()
    gamma, beta = bn.weight.detach(), bn.bias.detach()
    for i in range(2):
        pooled = [0.0] * 5
        for c in range(5):
            for y in range(4):
                for xx in range(4):
                    z = sum(float(w1[c, n]) * float(feat[i, n, y, xx]) for n in range(64))
                    z = (z - float(bn.running_mean[c])) / math.sqrt(float(bn.running_var[c]) + bn.eps)
                    pooled[c] += max(float(gamma[c]) * z + float(beta[c]), 0.0) / 16
        for k in range(4):
            ref = sum(float(w2[k, c]) * pooled[c] for c in range(5)) + float(b2[k])
            assert abs(float(out.cam_logits[i, k]) - ref) < 1e-4
    assert Stage1Net(create_backbone("tiny"), num_classes=4, num_attentions=3)(x).cam_logits is None
    with pytest.raises(ConfigError, match="no CAM head"):
        Stage1Net(create_backbone("tiny"), num_classes=4, num_attentions=3).cam_features(feat)


# --------------------------------------------------------------------------- center loss
def test_center_loss_value_and_update_with_repeated_labels() -> None:
    torch.manual_seed(0)
    K, D, beta = 4, 6, 0.05
    closs = CenterLoss(K, D)
    centers = torch.randn(K, D)
    closs.centers.copy_(centers)
    f = F.normalize(torch.randn(7, D), dim=1)
    y = torch.tensor([2, 0, 2, 2, 1, 0, 2])  # class 3 absent, class 2 four times

    def unit(v: list[float]) -> list[float]:
        n = math.sqrt(sum(t * t for t in v))
        return [t / n for t in v]

    expected_loss = sum(
        sum((float(f[b, d]) - unit(centers[int(y[b])].tolist())[d]) ** 2 for d in range(D)) for b in range(len(y))
    ) / len(y)
    assert float(closs(f, y)) == pytest.approx(expected_loss, rel=1e-5)

    expected = centers.clone()
    for k in range(K):
        members = [b for b in range(len(y)) if int(y[b]) == k]
        if not members:
            continue
        ck = unit(centers[k].tolist())
        for d in range(D):
            mean_diff = sum(float(f[b, d]) - ck[d] for b in members) / len(members)
            expected[k, d] = float(centers[k, d]) + beta * mean_diff
    closs.update(f, y, beta)
    torch.testing.assert_close(closs.centers, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(closs.centers[3], centers[3])  # untouched
    assert "centers" in closs.state_dict()


def test_center_sums_split_like_ddp_equal_one_update() -> None:
    torch.manual_seed(1)
    f = F.normalize(torch.randn(10, 5), dim=1)
    y = torch.tensor([0, 1, 1, 2, 0, 1, 2, 2, 0, 1])
    one, two = CenterLoss(3, 5), CenterLoss(3, 5)
    init = torch.randn(3, 5)
    one.centers.copy_(init)
    two.centers.copy_(init)
    one.update(f, y, 0.5)
    s1, c1 = two.batch_sums(f[:4], y[:4])  # "rank 0"
    s2, c2 = two.batch_sums(f[4:], y[4:])  # "rank 1"
    two.update_from_sums(s1 + s2, c1 + c2, 0.5)  # after an all_reduce(SUM)
    torch.testing.assert_close(one.centers, two.centers)
    assert c1.tolist() == [1.0, 2.0, 1.0]


def test_center_loss_gradient_flows_to_embedding_only() -> None:
    closs = CenterLoss(2, 3)
    closs.centers.copy_(torch.tensor([[1.0, 0, 0], [0, 2.0, 0]]))
    f = torch.tensor([[0.0, 1.0, 0.0]], requires_grad=True)
    assert float(closs(f.detach(), torch.tensor([1]))) == pytest.approx(0.0)
    loss = closs(f, torch.tensor([0]))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(2.0)
    torch.testing.assert_close(f.grad, torch.tensor([[-2.0, 2.0, 0.0]]))
    assert not closs.centers.requires_grad


# --------------------------------------------------------------------------- boxes and masks
def hand_map() -> torch.Tensor:
    """10x10 map: a 1.0 block at rows 3..5, cols 2..6, 0.3 background, one 0.45 pixel."""
    m = torch.full((10, 10), 0.3)
    m[3:6, 2:7] = 1.0
    m[8, 8] = 0.45
    return m


def test_attention_box_on_hand_made_map() -> None:
    m = hand_map()
    # same size: no interpolation; pixels > 0.5 are rows 3..5, cols 2..6; pad round(0.1 * 10) = 1 px
    assert attention_box(m, 0.5, 0.0, (10, 10)) == (2, 3, 7, 6)
    assert attention_box(m, 0.5, 0.1, (10, 10)) == (1, 2, 8, 7)
    assert attention_box(m, 0.4, 0.1, (10, 10)) == (1, 2, 10, 10)  # the 0.45 pixel joins; clipped at the edge
    assert attention_box(m, 0.5, 0.3, (10, 10)) == (0, 0, 10, 9)  # pad 3 px, clipped to the image
    assert attention_box(m, 1.0, 0.1, (10, 10)) == (0, 0, 10, 10)  # nothing strictly above: whole image
    assert attention_box(m, 0.5, 0.1, (10, 20)) == (2, 2, 16, 7)  # wider image: x scaled, pad 2 px in x


def bilinear_up(m: torch.Tensor, H: int, W: int) -> list[list[float]]:
    """align_corners=False bilinear upsampling written out (source coordinate (i + 0.5) * h / H - 0.5, clamped)."""
    h, w = m.shape

    def taps(i: int, n_out: int, n_in: int) -> tuple[int, int, float]:
        s = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(s)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        return i0, i1, s - i0

    out = []
    for i in range(H):
        y0, y1, fy = taps(i, H, h)
        row = []
        for j in range(W):
            x0, x1, fx = taps(j, W, w)
            top = float(m[y0, x0]) * (1 - fx) + float(m[y0, x1]) * fx
            bot = float(m[y1, x0]) * (1 - fx) + float(m[y1, x1]) * fx
            row.append(top * (1 - fy) + bot * fy)
        out.append(row)
    return out


def test_attention_box_upsampled_matches_plain_computation() -> None:
    torch.manual_seed(3)
    m = torch.rand(4, 5) ** 3
    H, W, thr, pad = 16, 20, 0.5 * float(m.max()), 0.1
    up = bilinear_up(m, H, W)
    ys = [i for i in range(H) for j in range(W) if up[i][j] > thr]
    xs = [j for i in range(H) for j in range(W) if up[i][j] > thr]
    py, px = round(pad * H), round(pad * W)
    expected = (max(min(xs) - px, 0), max(min(ys) - py, 0), min(max(xs) + 1 + px, W), min(max(ys) + 1 + py, H))
    assert attention_box(m, thr, pad, (H, W)) == expected


def test_drop_zeroes_exactly_the_pixels_above_threshold() -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 10, 10) + 0.1  # strictly positive, so a zero means "dropped"
    maps = torch.stack([hand_map(), hand_map().T])
    out = drop_images(images, maps, torch.tensor([0.5, 0.4]))
    for b, thr in enumerate((0.5, 0.4)):
        for i in range(10):
            for j in range(10):
                above = float(maps[b, i, j]) > thr
                if above:
                    assert (out[b, :, i, j] == 0).all()
                else:
                    assert torch.equal(out[b, :, i, j], images[b, :, i, j])


def test_crop_resize_is_box_cut_then_bilinear() -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 8, 12)
    boxes = torch.tensor([[2, 1, 7, 5], [0, 0, 12, 8]])
    out = crop_resize(images, boxes)
    ref0 = F.interpolate(images[:1, :, 1:5, 2:7], size=(8, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[:1], ref0)
    torch.testing.assert_close(out[1], images[1])  # whole-image box: unchanged


# --------------------------------------------------------------------------- map selection and the full augmentation
def test_selection_probabilities_and_zero_mean_never_chosen() -> None:
    A = torch.zeros(1, 3, 2, 2)
    A[0, 1] = 1.0  # mean 1 -> sqrt 1
    A[0, 2] = 4.0  # mean 4 -> sqrt 2
    torch.testing.assert_close(selection_probabilities(A), torch.tensor([[0.0, 1 / 3, 2 / 3]]))
    torch.testing.assert_close(selection_probabilities(torch.zeros(1, 4, 2, 2)), torch.full((1, 4), 0.25))

    many = A.expand(3000, -1, -1, -1)
    picks = select_attention_maps(many, torch.Generator().manual_seed(0))
    counts = torch.bincount(picks, minlength=3).tolist()
    assert counts[0] == 0
    assert abs(counts[2] / 3000 - 2 / 3) < 0.04  # binomial sd ~0.009


def test_attention_crop_drop_on_hand_made_attention() -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 10, 10) + 0.1
    attention = torch.zeros(2, 4, 10, 10)
    attention[0, 2] = hand_map()  # the only nonzero map of image 0: always selected
    attention[1, 0] = hand_map().T
    g = torch.Generator().manual_seed(123)
    crops, drops = attention_crop_drop(images, attention, (0.5, 0.5), (0.4, 0.4), 0.1, generator=g)
    # image 0: theta_c = 0.5 * max = 0.5 -> box (1, 2, 8, 7); theta_d = 0.4 -> the block and the 0.45 pixel dropped
    ref_crop0 = F.interpolate(images[:1, :, 2:7, 1:8], size=(10, 10), mode="bilinear", align_corners=False)
    torch.testing.assert_close(crops[:1], ref_crop0)
    ref_crop1 = F.interpolate(images[1:, :, 1:8, 2:7], size=(10, 10), mode="bilinear", align_corners=False)
    torch.testing.assert_close(crops[1:], ref_crop1)
    dropped0 = (drops[0] == 0).all(dim=0)
    assert torch.equal(dropped0, hand_map() > 0.4)
    assert torch.equal((drops[1] == 0).all(dim=0), hand_map().T > 0.4)

    # thresholds scale with the map's max: the same map times 10 gives the same boxes and masks
    g5 = torch.Generator().manual_seed(5)
    crops10, drops10 = attention_crop_drop(images, attention * 10, (0.5, 0.5), (0.4, 0.4), 0.1, g5)
    torch.testing.assert_close(crops10, crops)
    torch.testing.assert_close(drops10, drops)


def test_attention_crop_drop_reproducible_from_generator() -> None:
    torch.manual_seed(0)
    images = torch.rand(6, 3, 32, 32)
    attention = torch.rand(6, 8, 4, 4) ** 4
    a = attention_crop_drop(images, attention, (0.4, 0.6), (0.2, 0.5), 0.1, torch.Generator().manual_seed(7))
    torch.manual_seed(99)  # the global RNG plays no part
    b = attention_crop_drop(images, attention, (0.4, 0.6), (0.2, 0.5), 0.1, torch.Generator().manual_seed(7))
    c = attention_crop_drop(images, attention, (0.4, 0.6), (0.2, 0.5), 0.1, torch.Generator().manual_seed(8))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0]) or not torch.equal(a[1], c[1])
    assert a[0].shape == images.shape and a[1].shape == images.shape


def test_refine_crop_uses_mean_map_threshold_and_padding() -> None:
    torch.manual_seed(0)
    images = torch.rand(1, 3, 20, 20)
    attention = torch.zeros(1, 2, 20, 20)
    attention[0, 0, 5:9, 6:12] = 2.0
    attention[0, 1, 7:11, 8:10] = 2.0
    attention[0, 1, 0, 0] = 0.19  # mean 0.095 < 0.1 * max(mean) = 0.2: below the threshold
    # mean map: > 0.1 * 2.0 on rows 5..10, cols 6..11; pad round(0.05 * 20) = 1
    assert attention_boxes(attention.mean(dim=1), torch.tensor([0.2]), 0.05, (20, 20)).tolist() == [[5, 4, 13, 12]]
    out = refine_crop(images, attention, threshold=0.1, padding=0.05)
    ref = F.interpolate(images[:, :, 4:12, 5:13], size=(20, 20), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, ref)


@pytest.mark.gpu
def test_cuda_bf16_head_and_augmentation() -> None:
    """On CUDA under bf16 autocast: BAP stays float32 and finite; augmentation draws from a CUDA generator."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    net = Stage1Net(create_backbone("tiny"), num_classes=4, num_attentions=8).cuda()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = net(x)
    assert out.embedding.dtype == torch.float32 and torch.isfinite(out.embedding).all()
    F.cross_entropy(out.logits.float(), torch.tensor([0, 1, 2, 3], device="cuda")).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    runs = [
        attention_crop_drop(x, out.attention, (0.4, 0.6), (0.2, 0.5), 0.1, torch.Generator(device="cuda").manual_seed(3))
        for _ in range(2)
    ]
    for a, b in zip(*runs):
        assert a.device.type == "cuda" and a.shape == x.shape and torch.equal(a, b)


def test_plain_head_is_gap_then_linear_on_the_feature_layer() -> None:
    torch.manual_seed(0)
    net = Stage1Net(create_backbone("tiny"), num_classes=5, head="plain").eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = net(x)
        feat = net.features(x)["layer3"]  # (3, 64, 4, 4)
    want = feat.mean(dim=(2, 3)) @ net.cam_fc.weight.T + net.cam_fc.bias  # (3, 5)
    torch.testing.assert_close(out.logits, want)
    assert out.cam_logits is out.logits and out.attention is None
    torch.testing.assert_close(out.embedding, feat.mean(dim=(2, 3)))
    assert net.plain and net.embedding_dim == 64
    assert torch.equal(net.cam_features(feat), feat)  # OAAM's A is the feature layer itself
    assert net.fc is None and net.attention is None and "fc.weight" not in net.state_dict()
    with pytest.raises(ConfigError, match="model.head must be wsdan or plain"):
        Stage1Net(create_backbone("tiny"), num_classes=5, head="bilinear")
