"""The base every heatmap method shares: the batched forward, the backward and the normalisation.

One call handles a whole batch with ONE forward and (for gradient methods) ONE backward:

1. the backbone runs under ``no_grad`` and returns every stage (``model.features``; with the block before
   the last too when a method reads it);
2. the map A the gradient methods weight is detached and made a leaf that requires grad, and only what lies
   between A and the class scores runs with grad: with ``score`` ``wsdan``, A is the map at
   ``model.feature_layer`` and S the WS-DAN head's scores; with ``score`` ``cam`` (the default when the
   checkpoint has a CAM head), A is the CAM head's last conv maps (1x1 conv + BN + ReLU on the feature
   layer, non-negative, on the same grid; the feature layer itself for the plain head) and
   S = linear(GAP(A)), TL-AAM's plain classifier;
3. ``torch.autograd.grad(sum_b S_{c_b}, A)`` gives every sample's dS_c/dA at once: in eval mode the
   samples are independent, so d(sum_b S_b)/dA_b = dS_b/dA_b (no hooks);
4. the method turns that into a heatmap (B, H, W) (its only job, :meth:`HeatmapMethod.compute`);
5. each heatmap is divided by its own max (an all-zero map stays zero), so stored maps lie in [0, 1]: box
   extraction normalises by the max anyway (METHODS.md section 4) and float16 storage keeps full relative
   precision whatever the raw scale.

The logits returned with the heatmaps are those of the classifier ``score`` names (the CAM head's with
``cam``, the WS-DAN classifier's with ``wsdan``), for every method: with the predicted class as target, the
class a gradient method explains is exactly the argmax of the logits returned (and stored) beside it.

:func:`heatmaps_of` runs several methods on ONE such pass (Grad-CAM and Grad-CAM++ share the backward,
AOLM and BAP need none): extract-attention stores every method the checkpoint supports that way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Protocol

import torch
from torch import Tensor

from fgpipe.errors import ConfigError
from fgpipe.models.base import Backbone


class HeadLike(Protocol):
    """What ``Stage1Net.head`` returns (``fgpipe.models.wsdan.HeadOutput``)."""

    logits: Tensor  # (B, K) pre-softmax class scores
    embedding: Tensor  # (B, M*N) BAP feature
    attention: Tensor | None  # (B, M, H, W) WS-DAN attention maps; None for the plain head
    cam_logits: Tensor | None  # (B, K) the GAP + linear CAM head's scores, or None


class Stage1Like(Protocol):
    """The stage-1 network API the heatmap methods read (``fgpipe.models.wsdan.Stage1Net``)."""

    backbone: Backbone
    feature_layer: str
    num_classes: int
    training: bool
    cam_fc: torch.nn.Module | None

    def cam_features(self, feat: Tensor) -> Tensor: ...

    def cam_classify(self, cam_feat: Tensor) -> Tensor: ...

    def features(self, x: Tensor, penultimate: bool = False) -> dict[str, Tensor]: ...

    def head(self, feat: Tensor) -> HeadLike: ...

    def eval(self) -> Stage1Like: ...


class HeatmapBatch(NamedTuple):
    """Heatmaps of a batch with the classification that came with them."""

    heatmaps: Tensor  # (B, H, W) float32 at feature resolution, each in [0, 1] (max 1 unless all zero)
    logits: Tensor  # (B, K) float32 pre-softmax scores of the explained classifier (``score``)
    predictions: Tensor  # (B,) int64 argmax of the logits


class HeatmapSet(NamedTuple):
    """Several methods' heatmaps of a batch from one forward pass, with the classification that came with them."""

    heatmaps: dict[str, Tensor]  # method name -> (B, H, W) float32, each as in HeatmapBatch
    logits: Tensor  # (B, K) float32 pre-softmax scores of the explained classifier (``score``)
    predictions: Tensor  # (B,) int64 argmax of the logits


@dataclass(frozen=True)
class ForwardPass:
    """Everything one batched forward (and backward) produced, handed to :meth:`HeatmapMethod.compute`."""

    features: dict[str, Tensor]  # every backbone stage (+ PENULTIMATE_BLOCK when asked), computed under no_grad
    activation: Tensor  # (B, C, H, W) A: the feature_layer map, or (score cam) the CAM head's last conv maps; float32+
    gradient: Tensor | None  # (B, C, H, W) dS_c/dA for each sample's target c; None without a backward
    output: HeadLike  # the head's output (logits, embedding, attention); compute() runs under no_grad
    targets: Tensor  # (B,) the class c whose score S_c is explained (differentiated when there is a gradient)
    logits: Tensor  # (B, K) S: the explained classifier's scores, detached


class HeatmapMethod(ABC):
    """A heatmap method: subclasses set ``name`` (and ``needs_gradient``) and implement only :meth:`compute`.

    The constructor puts ``model`` in eval mode: batch-norm statistics of a training-mode model would
    couple the samples of a batch and make the batched backward wrong.
    """

    #: registry name (``fgpipe extract-attention --method NAME``)
    name: ClassVar[str]
    #: whether :meth:`compute` needs dS_c/dA (one backward per batch)
    needs_gradient: ClassVar[bool] = False
    #: whether :meth:`compute` reads the block before the last (``features[PENULTIMATE_BLOCK]``)
    needs_penultimate: ClassVar[bool] = False
    #: whether ``flip`` averages this method's map with that of the mirrored image (map-valued methods);
    #: False for a box-valued method (AOLM), which always runs as its paper defines it
    flip_averaged: ClassVar[bool] = True

    @classmethod
    def unsupported(cls, model: Stage1Like) -> str | None:
        """Why this method cannot run on ``model`` (None: it can); the constructor raises it as a ConfigError."""
        return None

    def __init__(self, model: Stage1Like, normalize: bool = True, score: str = "auto") -> None:
        """``score``: the classifier whose score gradient methods differentiate and whose logits are returned:
        ``cam`` (the CAM head, TL-AAM's plain CNN classifier; A is then its last conv maps), ``wsdan`` (the BAP
        classifier; A is the feature layer's map) or ``auto`` (cam when the model has a CAM head)."""
        reason = self.unsupported(model)
        if reason is not None:
            raise ConfigError(f"attention.method `{self.name}` cannot run on this stage-1 network: {reason}")
        self.model = model
        self.normalize = normalize
        has_cam = getattr(model, "cam_fc", None) is not None
        if score not in ("auto", "cam", "wsdan"):
            raise ConfigError(f"attention.score must be auto, cam or wsdan, got `{score}`")
        if score == "cam" and not has_cam:
            raise ConfigError(
                "attention.score is `cam` but the stage-1 checkpoint has no CAM head: train it with "
                "model.cam_channels > 0, or set attention.score: wsdan"
            )
        self.score = ("cam" if has_cam else "wsdan") if score == "auto" else score
        stages = model.backbone.stage_names
        if model.feature_layer not in stages:
            raise ConfigError(
                f"model.feature_layer `{model.feature_layer}` is not a stage of the backbone "
                f"(allowed: {', '.join(stages)})"
            )
        model.eval()

    @property
    def layer(self) -> str:
        """The backbone stage whose grid the heatmaps are on (recorded in attention.h5)."""
        return self.model.feature_layer

    @abstractmethod
    def compute(self, fp: ForwardPass) -> Tensor:
        """The raw heatmaps (B, H, W) of one forward pass (non-negative; normalised by the caller)."""

    def __call__(self, images: Tensor, targets: Tensor | None = None, flip: bool = False) -> HeatmapBatch:
        """Heatmaps of ``images`` (B, 3, H, W); gradient methods explain ``targets`` (B,) or the predicted class.
        ``flip``: see :func:`heatmaps_of`."""
        out = heatmaps_of([self], images, targets, flip=flip)
        return HeatmapBatch(out.heatmaps[self.name], out.logits, out.predictions)

    def finish(self, fp: ForwardPass) -> Tensor:
        """:meth:`compute` on ``fp``, shape-checked and (``normalize``) divided by each map's max: (B, H, W) float32."""
        with torch.no_grad():
            heat = self.compute(fp)  # (B, H, W)
            if heat.shape != (fp.activation.shape[0], *self._grid(fp.features)):
                raise RuntimeError(f"{type(self).__name__}.compute returned shape {tuple(heat.shape)}")
            if self.normalize:
                peak = heat.amax(dim=(1, 2), keepdim=True)  # (B, 1, 1)
                heat = heat / torch.where(peak > 0, peak, torch.ones_like(peak))
        return heat.float()

    def _grid(self, features: dict[str, Tensor]) -> tuple[int, int]:
        """(H, W) of the heatmaps: the grid of :attr:`layer`."""
        h, w = features[self.layer].shape[-2:]
        return int(h), int(w)


def _explained(output: HeadLike, score: str) -> Tensor:
    """The class scores (B, K) being explained: the CAM head's (``score`` cam) or the WS-DAN classifier's."""
    if score == "cam":
        if output.cam_logits is None:
            raise RuntimeError("the model returned no CAM-head scores although it has a CAM head")
        return output.cam_logits
    return output.logits


def _targets(logits: Tensor, targets: Tensor | None) -> Tensor:
    """The class explained per sample: ``targets`` if given (checked), else the predicted class."""
    if targets is None:
        return logits.detach().argmax(dim=1)
    targets = torch.as_tensor(targets, device=logits.device).long()
    b, k = logits.shape
    if targets.shape != (b,):
        raise ValueError(f"targets must have shape ({b},), got {tuple(targets.shape)}")
    if ((targets < 0) | (targets >= k)).any():
        raise ValueError(f"targets must be class indices in [0, {k}), got {targets.tolist()}")
    return targets


def forward_pass(
    model: Stage1Like,
    score: str,
    images: Tensor,
    targets: Tensor | None = None,
    gradient: bool = False,
    penultimate: bool = False,
    who: str = "forward_pass",
) -> ForwardPass:
    """ONE batched forward of ``images`` (B, 3, H, W) and, with ``gradient``, ONE backward of the ``score``
    classifier's S_c to A, c = ``targets`` or the predicted class (steps 1-3 of the module docstring)."""
    if images.ndim != 4:
        raise ValueError(f"images must be a batch (B, 3, H, W), got shape {tuple(images.shape)}")
    if model.training:
        raise RuntimeError(
            f"{who}: the model is in training mode; batch statistics would couple the "
            "samples of a batch. Call model.eval() first."
        )
    with torch.no_grad():
        features = model.features(images, penultimate=True) if penultimate else model.features(images)
    feat = features[model.feature_layer].detach()  # (B, C, H, W)
    dtype = torch.promote_types(feat.dtype, torch.float32)  # half/bf16 -> float32, float64 stays

    grad: Tensor | None = None
    activation = feat
    if gradient and score == "cam":
        # A = the CAM head's last conv maps; S = GAP + linear on them: the only op with grad is that linear map
        with torch.no_grad():
            output = model.head(feat)
            activation = model.cam_features(feat).detach()  # (B, C', H, W)
        activation.requires_grad_(True)
        with torch.enable_grad():
            explained = model.cam_classify(activation)  # (B, K)
            chosen = _targets(explained, targets)
            (grad,) = torch.autograd.grad(explained.gather(1, chosen[:, None]).sum(), activation)
        grad = grad.to(dtype)
    elif gradient:
        feat.requires_grad_(True)
        with torch.enable_grad():
            output = model.head(feat)
            explained = _explained(output, score)  # (B, K) the scores S being explained
            chosen = _targets(explained, targets)
            # sum over the batch of each sample's own S_c: one backward gives every dS_c/dA_b at once
            (grad,) = torch.autograd.grad(explained.gather(1, chosen[:, None]).sum(), feat)
        grad = grad.to(dtype)
    else:
        with torch.no_grad():
            output = model.head(feat)
        explained = _explained(output, score)  # (B, K)
        chosen = _targets(explained, targets)
    return ForwardPass(
        features=features,
        activation=activation.detach().to(dtype),
        gradient=grad,
        output=output,
        targets=chosen,
        logits=explained.detach(),
    )


def heatmaps_of(
    methods: Sequence[HeatmapMethod], images: Tensor, targets: Tensor | None = None, flip: bool = False
) -> HeatmapSet:
    """Every method's heatmaps of ``images`` from ONE forward pass (and at most one backward).

    The methods must share the model and the ``score`` (hence the gradient, the targets and the logits);
    each heatmap equals what the method alone returns.

    ``flip`` (test-time mirroring): a second pass on the mirrored images, explaining the same classes; each
    map-valued method's heatmap becomes the mean of its (normalised) map and the mirrored-back map of the
    mirrored image, normalised again. Box-valued methods (``flip_averaged`` False: AOLM) keep the first
    pass's map; the logits and predictions are always the first pass's.
    """
    if not methods:
        raise ValueError("heatmaps_of needs at least one method")
    first = methods[0]
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"heatmaps_of: a method is named twice in {names}")
    for m in methods[1:]:
        if m.model is not first.model or m.score != first.score:
            raise ValueError(f"heatmaps_of: `{m.name}` runs on another model or score than `{first.name}`")
    fp = forward_pass(
        first.model, first.score, images, targets,
        gradient=any(m.needs_gradient for m in methods),
        penultimate=any(m.needs_penultimate for m in methods),
        who="+".join(names),
    )
    logits = fp.logits.float()
    heat = {m.name: m.finish(fp) for m in methods}
    averaged = [m for m in methods if m.flip_averaged]
    if flip and averaged:
        fp_flip = forward_pass(
            first.model, first.score, images.flip(-1), fp.targets,
            gradient=any(m.needs_gradient for m in averaged),
            penultimate=any(m.needs_penultimate for m in averaged),
            who="+".join(m.name for m in averaged) + " (mirrored)",
        )
        for m in averaged:
            mean = (heat[m.name] + m.finish(fp_flip).flip(-1)) / 2  # (B, H, W)
            if m.normalize:
                peak = mean.amax(dim=(1, 2), keepdim=True)
                mean = mean / torch.where(peak > 0, peak, torch.ones_like(peak))
            heat[m.name] = mean
    return HeatmapSet(heat, logits, logits.argmax(dim=1))


class CAMMethod(HeatmapMethod):
    """Class activation maps L = ReLU(sum_k w_k A_k); subclasses override only :meth:`weights`."""

    needs_gradient = True

    @abstractmethod
    def weights(self, activation: Tensor, gradient: Tensor) -> Tensor:
        """Channel weights w (B, K) from A (B, K, H, W) and g = dS_c/dA (B, K, H, W)."""

    def compute(self, fp: ForwardPass) -> Tensor:
        if fp.gradient is None:
            raise RuntimeError(f"{type(self).__name__} needs the gradient but the forward pass has none")
        w = self.weights(fp.activation, fp.gradient)  # (B, K)
        return torch.relu(torch.einsum("bk,bkhw->bhw", w, fp.activation))  # (B, H, W)
