"""WS-DAN stage-1 head: attention maps, bilinear attention pooling (BAP), center loss, attention
crop/drop augmentation and test-time refinement (METHODS.md section 2).

Sampling (map choice, thresholds) draws only from an explicit ``torch.Generator``, in a fixed order,
so the trainer can reproduce every augmented batch from its seed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fgpipe.errors import ConfigError
from fgpipe.models.base import Backbone

SQRT_EPS = 1e-12  # signed sqrt: sign(P) * sqrt(|P| + eps)


# --------------------------------------------------------------------------- BAP and the head
def bap(attention: Tensor, features: Tensor) -> Tensor:
    """Bilinear attention pooling: (B, M, H, W) x (B, N, H, W) -> (B, M*N), signed-sqrt, L2-normalised.

    P = einsum('bmhw,bnhw->bmn', A, F) / (H*W); computed in float32 with autocast off (the signed sqrt
    and the normalisation are unstable in bf16).
    """
    B, M, H, W = attention.shape
    N = features.shape[1]
    with torch.autocast(device_type=features.device.type, enabled=False):
        a, f = attention.float(), features.float()
        P = torch.einsum("bmhw,bnhw->bmn", a, f) / (H * W)  # (B, M, N)
        P = torch.sign(P) * torch.sqrt(P.abs() + SQRT_EPS)  # (B, M, N) signed sqrt
        return F.normalize(P.reshape(B, M * N), dim=-1)  # (B, M*N), unit L2 norm


class HeadOutput(NamedTuple):
    """What the WS-DAN head returns."""

    logits: Tensor  # (B, K) pre-softmax; = fc(logit_scale * embedding) (plain head: the GAP + linear scores)
    embedding: Tensor  # (B, M*N) BAP feature after signed sqrt + L2 normalisation (center-loss input); plain: (B, N) pooled
    attention: Tensor | None  # (B, M, H, W) attention maps, >= 0; None for the plain head
    cam_logits: Tensor | None = None  # (B, K) the CAM head's class scores (None without a CAM head; plain: = logits)


class Stage1Net(nn.Module):
    """Backbone + WS-DAN head: A = ReLU(BN(Conv1x1(F))) on the feature layer, BAP, linear classifier.

    With ``cam_channels`` > 0 the feature layer also feeds a plain CNN classifier, TL-AAM's: a last conv
    layer ``cam_conv`` (1x1 conv + BN + ReLU to ``cam_channels`` maps, like EfficientNet's and MobileNet's
    conv head) then global average pooling and a linear layer ``cam_fc``. Its score is the one OAAM's
    Grad-CAM++ differentiates, on its non-negative last conv maps (METHODS.md section 3); it trains beside
    the WS-DAN loss on the raw, crop and drop views (the drops erase the strongest part, so its class
    evidence has to spread over the whole object).

    With ``head`` ``plain`` there is no WS-DAN part at all: the classifier is global average pooling and a
    linear layer on the feature layer itself (``cam_conv`` is the identity, ``cam_fc`` the linear layer), the
    plain fine-tune every paper reports beside its method, and the classifier OAAM explains in TL-AAM.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        num_attentions: int = 32,
        feature_layer: str = "",
        logit_scale: float = 100.0,
        cam_channels: int = 0,
        head: str = "wsdan",
    ) -> None:
        """``feature_layer`` "" picks the backbone's last stage; an unknown name is a ConfigError."""
        if head not in ("wsdan", "plain"):
            raise ConfigError(f"model.head must be wsdan or plain, got `{head}`")
        super().__init__()
        if feature_layer and feature_layer not in backbone.stage_names:
            raise ConfigError(
                f"model.feature_layer: backbone `{getattr(backbone, 'name', type(backbone).__name__)}` "
                f"has no stage `{feature_layer}` "
                f"(stages: {', '.join(backbone.stage_names)}; empty = the last one)"
            )
        self.backbone = backbone
        self.feature_layer = feature_layer or backbone.last_stage
        self.num_classes = num_classes
        self.num_attentions = num_attentions
        self.logit_scale = logit_scale
        self.feature_channels = backbone.stage_channels[self.feature_layer]  # N
        self.head_kind = head
        self.cam_conv: nn.Module | None = None
        self.cam_fc: nn.Linear | None = None
        if head == "plain":
            self.cam_channels = self.feature_channels
            self.cam_conv = nn.Identity()  # the classifier reads the feature layer itself
            self.cam_fc = nn.Linear(self.feature_channels, num_classes)
            self.attention: nn.Module | None = None
            self.fc: nn.Linear | None = None
            return
        self.attention = nn.Sequential(
            nn.Conv2d(self.feature_channels, num_attentions, kernel_size=1, bias=False),
            nn.BatchNorm2d(num_attentions, eps=1e-3),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(num_attentions * self.feature_channels, num_classes, bias=False)
        self.cam_channels = cam_channels
        if cam_channels > 0:
            self.cam_conv = nn.Sequential(
                nn.Conv2d(self.feature_channels, cam_channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(cam_channels),
                nn.ReLU(inplace=True),
            )
            self.cam_fc = nn.Linear(cam_channels, num_classes)

    @property
    def plain(self) -> bool:
        """Whether this is the plain GAP + linear classifier (no attention maps, crop, drop or center loss)."""
        return self.head_kind == "plain"

    @property
    def embedding_dim(self) -> int:
        """M * N: the BAP feature's (and the center loss's) dimension; N for the plain head."""
        return self.feature_channels if self.plain else self.num_attentions * self.feature_channels

    def features(self, x: Tensor, penultimate: bool = False) -> dict[str, Tensor]:
        """Every backbone stage for input ``x`` (B, 3, H, W); with ``penultimate`` also the block before the
        last (key ``fgpipe.models.base.PENULTIMATE_BLOCK``, for AOLM)."""
        return self.backbone.forward_features(x, penultimate=penultimate)

    def head(self, feat: Tensor) -> HeadOutput:
        """The head on the feature layer's map ``feat`` (B, N, h, w)."""
        if self.plain:
            assert self.cam_fc is not None
            pooled = feat.mean(dim=(2, 3))  # (B, N)
            logits = self.cam_fc(pooled)  # (B, K)
            return HeadOutput(logits, pooled, None, logits)
        attention = self.attention(feat)  # (B, M, h, w)
        embedding = bap(attention, feat)  # (B, M*N)
        logits = self.fc(embedding * self.logit_scale)  # (B, K)
        cam_logits = self.cam_classify(self.cam_features(feat)) if self.cam_conv is not None else None  # (B, K)
        return HeadOutput(logits, embedding, attention, cam_logits)

    def cam_features(self, feat: Tensor) -> Tensor:
        """The CAM head's last conv maps (B, cam_channels, h, w), >= 0, from the feature layer's map."""
        if self.cam_conv is None:
            raise ConfigError("this stage-1 network has no CAM head (model.cam_channels: 0)")
        return self.cam_conv(feat)

    def cam_classify(self, cam_feat: Tensor) -> Tensor:
        """Class scores (B, K) from the CAM head's maps: global average pooling, then the linear layer."""
        assert self.cam_fc is not None
        return self.cam_fc(cam_feat.mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> HeadOutput:
        return self.head(self.features(x)[self.feature_layer])


# --------------------------------------------------------------------------- center loss
class CenterLoss(nn.Module):
    """Center loss on the normalised BAP feature, one center per class (buffer ``centers``, checkpointed).

    loss = mean_b ||f_b - normalize(c_{y_b})||^2. Update (no gradient):
    c_y <- c_y + beta * mean over the batch's samples of class y of (f - normalize(c_y)).
    Under DDP: ``sums, counts = batch_sums(f, y)``, all_reduce both (SUM), then ``update_from_sums``.
    """

    centers: Tensor

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("centers", torch.zeros(num_classes, dim))  # (K, D)

    def forward(self, embedding: Tensor, labels: Tensor) -> Tensor:
        target = F.normalize(self.centers[labels], dim=-1)  # (B, D)
        return (embedding.float() - target).pow(2).sum(dim=1).mean()

    @torch.no_grad()
    def batch_sums(self, embedding: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Per-class sums of (f - normalize(c_y)) (K, D) and sample counts (K,), for an all_reduce."""
        diff = embedding.detach().to(self.centers.dtype) - F.normalize(self.centers[labels], dim=-1)  # (B, D)
        sums = torch.zeros_like(self.centers).index_add_(0, labels, diff)  # (K, D)
        counts = torch.zeros(self.centers.shape[0], dtype=self.centers.dtype, device=self.centers.device)
        counts.index_add_(0, labels, torch.ones_like(labels, dtype=self.centers.dtype))  # (K,)
        return sums, counts

    @torch.no_grad()
    def update_from_sums(self, sums: Tensor, counts: Tensor, beta: float) -> None:
        """c_y += beta * sums_y / counts_y for every class with counts_y > 0."""
        seen = counts > 0
        self.centers[seen] += beta * sums[seen] / counts[seen].unsqueeze(1)  # (K_seen, D)

    @torch.no_grad()
    def update(self, embedding: Tensor, labels: Tensor, beta: float) -> None:
        """Single-process update from one batch."""
        self.update_from_sums(*self.batch_sums(embedding, labels), beta)


# --------------------------------------------------------------------------- attention augmentation
def selection_probabilities(attention: Tensor) -> Tensor:
    """P(map k) per image, proportional to sqrt(mean(A_k)); uniform where every map is zero. (B, M)."""
    w = attention.detach().float().mean(dim=(2, 3)).clamp(min=0).sqrt()  # (B, M)
    total = w.sum(dim=1, keepdim=True)  # (B, 1)
    uniform = torch.full_like(w, 1.0 / w.shape[1])
    return torch.where(total > 0, w / total.clamp(min=torch.finfo(w.dtype).tiny), uniform)


def select_attention_maps(attention: Tensor, generator: torch.Generator) -> Tensor:
    """One map index per image (B,), drawn with :func:`selection_probabilities` from ``generator``."""
    probs = selection_probabilities(attention).to(generator.device)  # (B, M)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(attention.device)  # (B,)


def _upsample(maps: Tensor, out_hw: tuple[int, int]) -> Tensor:
    """(B, h, w) -> (B, H, W), bilinear, align_corners=False (cell edges map to image edges)."""
    return F.interpolate(maps.float().unsqueeze(1), size=out_hw, mode="bilinear", align_corners=False).squeeze(1)


def attention_boxes(maps: Tensor, thresholds: Tensor, padding: float, out_hw: tuple[int, int]) -> Tensor:
    """Boxes (B, 4) long (x0, y0, x1, y1; x1/y1 exclusive) of the upsampled maps' pixels above ``thresholds``.

    ``maps`` (B, h, w) at feature resolution, ``thresholds`` (B,) absolute values. The box is padded by
    ``padding * W`` / ``padding * H`` pixels (rounded half up) and clipped to the image; an empty mask
    gives the whole image.
    """
    H, W = out_hw
    mask = _upsample(maps, out_hw) > thresholds.to(maps.device).float().view(-1, 1, 1)  # (B, H, W)
    rows, cols = mask.any(dim=2), mask.any(dim=1)  # (B, H), (B, W)
    y0 = rows.int().argmax(dim=1)  # first row above the threshold (argmax returns the first maximum)
    y1 = H - rows.flip(1).int().argmax(dim=1)  # one past the last
    x0 = cols.int().argmax(dim=1)
    x1 = W - cols.flip(1).int().argmax(dim=1)
    py, px = int(padding * H + 0.5), int(padding * W + 0.5)
    boxes = torch.stack(
        [(x0 - px).clamp(min=0), (y0 - py).clamp(min=0), (x1 + px).clamp(max=W), (y1 + py).clamp(max=H)], dim=1
    )  # (B, 4)
    whole = torch.tensor([0, 0, W, H], device=boxes.device, dtype=boxes.dtype)
    return torch.where(rows.any(dim=1, keepdim=True), boxes, whole).long()  # (B, 4)


def attention_box(
    map_2d: Tensor, threshold: float, padding: float, out_hw: tuple[int, int]
) -> tuple[int, int, int, int]:
    """The crop box of one map (h, w): upsample to ``out_hw``, pixels > ``threshold``, pad, clip."""
    box = attention_boxes(map_2d.unsqueeze(0), torch.tensor([threshold]), padding, out_hw)[0]
    x0, y0, x1, y1 = (int(v) for v in box.tolist())
    return x0, y0, x1, y1


def crop_resize(images: Tensor, boxes: Tensor) -> Tensor:
    """Cut box i (x0, y0, x1, y1) out of image i and resize it back to the input size (bilinear). (B, C, H, W)."""
    H, W = images.shape[-2:]
    out = []
    for image, (x0, y0, x1, y1) in zip(images, boxes.tolist()):
        crop = image[None, :, y0:y1, x0:x1]  # (1, C, y1 - y0, x1 - x0)
        out.append(F.interpolate(crop, size=(H, W), mode="bilinear", align_corners=False))
    return torch.cat(out, dim=0)  # (B, C, H, W)


def drop_images(images: Tensor, maps: Tensor, thresholds: Tensor) -> Tensor:
    """Zero image i where its upsampled map exceeds thresholds[i]; ``maps`` (B, h, w). (B, C, H, W)."""
    H, W = images.shape[-2:]
    keep = _upsample(maps, (H, W)) <= thresholds.to(maps.device).float().view(-1, 1, 1)  # (B, H, W)
    return images * keep.unsqueeze(1).to(images.dtype)  # (B, C, H, W)


def _uniform(lo_hi: tuple[float, float], n: int, generator: torch.Generator) -> Tensor:
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=generator.device)  # (n,)


@torch.no_grad()
def attention_crop_drop(
    images: Tensor,
    attention: Tensor,
    crop_threshold: tuple[float, float],
    drop_threshold: tuple[float, float],
    padding: float,
    generator: torch.Generator,
    independent_maps: bool = False,
) -> tuple[Tensor, Tensor]:
    """WS-DAN's attention crop and drop of every image (B, C, H, W) from its attention maps (B, M, h, w).

    Per image: map k ~ sqrt(mean(A_k)) (normalised); crop: theta_c ~ U(crop_threshold) * max(A_k), box of
    the upsampled A_k's pixels above it, padded by ``padding`` * side, resized back; drop: theta_d ~
    U(drop_threshold) * max(A_k), zero where the upsampled A_k exceeds it. ``independent_maps`` draws a
    second map for the drop (as the WS-DAN reference code does) instead of reusing k.
    Draw order from ``generator``: crop maps (B), [drop maps (B)], crop fractions (B), drop fractions (B).
    """
    B = images.shape[0]
    attention = attention.detach().float()  # (B, M, h, w)
    k_crop = select_attention_maps(attention, generator)  # (B,)
    k_drop = select_attention_maps(attention, generator) if independent_maps else k_crop
    u_crop = _uniform(crop_threshold, B, generator).to(attention.device)  # (B,)
    u_drop = _uniform(drop_threshold, B, generator).to(attention.device)  # (B,)
    idx = torch.arange(B, device=attention.device)
    crop_maps, drop_maps = attention[idx, k_crop], attention[idx, k_drop]  # (B, h, w) each
    theta_c = u_crop * crop_maps.amax(dim=(1, 2))  # (B,)
    theta_d = u_drop * drop_maps.amax(dim=(1, 2))  # (B,)
    boxes = attention_boxes(crop_maps, theta_c, padding, tuple(images.shape[-2:]))  # (B, 4)
    return crop_resize(images, boxes), drop_images(images, drop_maps, theta_d)


@torch.no_grad()
def refine_boxes(attention: Tensor, out_hw: tuple[int, int], threshold: float = 0.1, padding: float = 0.05) -> Tensor:
    """Test-time boxes (B, 4) from the mean of all M maps: pixels > threshold * max, padded."""
    mean_map = attention.detach().float().mean(dim=1)  # (B, h, w)
    return attention_boxes(mean_map, threshold * mean_map.amax(dim=(1, 2)), padding, out_hw)


@torch.no_grad()
def refine_crop(images: Tensor, attention: Tensor, threshold: float = 0.1, padding: float = 0.05) -> Tensor:
    """Test-time refinement crop: :func:`refine_boxes`, cut and resized back to the input size. (B, C, H, W)."""
    return crop_resize(images, refine_boxes(attention, tuple(images.shape[-2:]), threshold, padding))
