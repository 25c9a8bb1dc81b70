"""LCAM (METHODS.md section 1) against plain per-channel loops, its adaptive kernel size, its placement."""

from __future__ import annotations

import math

import pytest
import torch

from fgpipe.errors import ConfigError
from fgpipe.models import LCAM, adaptive_kernel_size, create_backbone


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def nearest_odd_kernel(channels: int) -> int:
    """The spec read literally: |log2(C)/2 + 1/2| to the nearest odd number (ties to the larger), >= 3."""
    t = abs(math.log2(channels) / 2 + 0.5)
    candidates = range(1, 2 * int(t) + 5, 2)
    best = min(candidates, key=lambda k: (abs(k - t), -k))  # nearest; on a tie the larger odd number
    return max(best, 3)


@pytest.mark.parametrize(
    ("channels", "expected"),
    [(2, 3), (8, 3), (16, 3), (64, 3), (128, 5), (256, 5), (512, 5), (1024, 5), (2048, 7), (4096, 7), (1280, 5), (768, 5)],
)
def test_adaptive_kernel_size_table(channels: int, expected: int) -> None:
    assert adaptive_kernel_size(channels) == expected
    assert nearest_odd_kernel(channels) == expected


def test_adaptive_kernel_size_is_nearest_odd_for_every_width() -> None:
    for channels in range(1, 5000):
        assert adaptive_kernel_size(channels) == nearest_odd_kernel(channels), channels


def lcam_loop(x: torch.Tensor, weight: list[float]) -> torch.Tensor:
    """LCAM written per sample and per channel: zero-padded 1-D conv over the pooled channel vector."""
    B, C, H, W = x.shape
    k = len(weight)
    pad = (k - 1) // 2
    out = torch.empty_like(x)
    for b in range(B):
        y = [float(x[b, c].sum()) / (H * W) for c in range(C)]
        for c in range(C):
            s = 0.0
            for j in range(k):
                src = c + j - pad
                if 0 <= src < C:
                    s += weight[j] * y[src]
            out[b, c] = x[b, c] * (1.0 / (1.0 + math.exp(-s)))
    return out


@pytest.mark.parametrize(("channels", "kernel"), [(7, 3), (16, 5), (64, 0), (5, 7)])
def test_lcam_matches_per_channel_loop(channels: int, kernel: int) -> None:
    torch.manual_seed(0)
    lcam = LCAM(channels, kernel).double()
    with torch.no_grad():
        lcam.conv.weight.copy_(torch.randn_like(lcam.conv.weight) * 2)
    x = torch.randn(2, channels, 3, 4, dtype=torch.float64)
    expected = lcam_loop(x, lcam.conv.weight.view(-1).tolist())
    torch.testing.assert_close(lcam(x), expected, rtol=1e-10, atol=1e-12)
    assert lcam.kernel_size == (kernel or adaptive_kernel_size(channels))
    assert lcam.conv.bias is None


@pytest.mark.parametrize("kernel", [1, 2, 4, -1])
def test_bad_fixed_kernel_is_a_config_error(kernel: int) -> None:
    with pytest.raises(ConfigError, match="lcam_kernel"):
        LCAM(16, kernel)
    with pytest.raises(ConfigError, match="lcam_kernel"):
        create_backbone("tiny", lcam="block", lcam_kernel=kernel)


def test_bad_placement_names_the_allowed_values() -> None:
    with pytest.raises(ConfigError, match="none, block, stage"):
        create_backbone("tiny", lcam="everywhere")


@pytest.mark.parametrize(
    ("name", "placement", "count"),
    [
        ("tiny", "none", 0),
        ("tiny", "block", 6),  # 3 stages x (strided conv block + residual block)
        ("tiny", "stage", 3),
        ("resnet18", "block", 8),  # 2+2+2+2 residual blocks
        ("resnet50", "block", 16),  # 3+4+6+3
        ("resnet50", "stage", 4),
        ("inception_v3", "block", 11),  # Mixed_5b..5d, 6a..6e, 7a..7c
        ("inception_v3", "stage", 3),
        ("efficientnet_lite0", "block", 16),  # MBConv blocks; not the head conv
        ("efficientnet_lite0", "stage", 6),
    ],
)
def test_placement_counts(name: str, placement: str, count: int) -> None:
    backbone = create_backbone(name, lcam=placement)
    modules = [m for m in backbone.modules() if isinstance(m, LCAM)]
    assert len(modules) == count
    if placement == "stage":  # one per stage, sized to the stage's channels
        assert sorted(m.channels for m in modules) == sorted(backbone.stage_channels.values())


def test_fixed_kernel_reaches_every_module() -> None:
    backbone = create_backbone("resnet18", lcam="block", lcam_kernel=7)
    assert {m.kernel_size for m in backbone.modules() if isinstance(m, LCAM)} == {7}
    adaptive = create_backbone("resnet18", lcam="block")
    sizes = {m.channels: m.kernel_size for m in adaptive.modules() if isinstance(m, LCAM)}
    assert sizes == {c: adaptive_kernel_size(c) for c in (64, 128, 256, 512)}


def test_stage_placement_reweights_each_stage_output() -> None:
    """lcam=stage: layer1's output is LCAM(layer1 of the same trunk without LCAM); block: after each block."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    plain = create_backbone("tiny", lcam="none").eval()
    staged = create_backbone("tiny", lcam="stage").eval()
    staged.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        ref = plain.forward_features(x)
        got = staged.forward_features(x)
        torch.testing.assert_close(got["layer1"], staged.lcam["layer1"](ref["layer1"]))
        # every stage is re-weighted: the later ones differ from the plain trunk
        assert all(not torch.allclose(got[s], ref[s]) for s in staged.stage_names)

        blocked = create_backbone("tiny", lcam="block").eval()
        blocked.load_state_dict(plain.state_dict(), strict=False)
        h = blocked.forward_stem(x)
        h = blocked.lcam["layer1_0"](blocked.layer1[0](h))
        h = blocked.lcam["layer1_1"](blocked.layer1[1](h))
        torch.testing.assert_close(blocked.forward_features(x)["layer1"], h)
