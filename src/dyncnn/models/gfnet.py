"""Glance and Focus (GFNet, Wang et al. 2020): region-level spatially adaptive inference, executed for real.

Step 1 (the *glance*) runs a global encoder on the whole image down-sampled (e.g. 128 -> 32). Each later step
(a *focus*) runs a local encoder on a full-resolution patch (e.g. 32x32) cropped where a recurrent policy points.
A recurrent classifier (a GRU over the step features) gives logits after every step, so GFNet is a multi-exit
network over steps: a confident sample stops after the glance, a hard one (a small digit among clutter) looks at
more patches. The policy is an actor-critic GRU over the detached step features and a soft-argmax "where" read
from the step's feature map (a pooled feature keeps almost no position): the actor gives the mean of a Gaussian
over the next patch centre (std 0.1 in training, the mean at test), the critic a value for PPO. The policy runs
at the start of the next focus step, i.e. only for the samples that did not exit.

``forward(x)`` returns the per-step logits (a list, as every multi-exit network: training and the budgeted
protocol's ``collect_exit_logits``). ``infer(x, policy)`` is the executed early exit: samples whose step is
confident enough leave the batch (``dynamic.executor.early_exit_inference``), patches are cropped for the
whole batch at once, and each sample is charged the MACs of the steps it ran. ``exit_macs(x)`` gives the
cumulative MACs of stopping after each step, so ``dynamic.budget`` / ``dyncnn calibrate`` / ``eval --budget``
work on GFNet unchanged. The three training stages live in :mod:`dyncnn.train.recipes.glance`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dynamic.executor import ExitResult, Executor, early_exit_inference, eval_copy, measure_macs
from ..dynamic.exits import as_policy
from ..dynamic.patches import crop_patches
from ..dynamic.policy import ExitPolicy
from ..errors import DyncnnError, check_image_batch
from .base import is_exporting
from .registry import create_model, register_model


@dataclass(frozen=True)
class GFNetConfig:
    """Architecture of a GFNet. Backbones are registered dyncnn names with ``forward_features``."""
    backbone: str = "tiny_mobilenet"              # local encoder (full-resolution patches)
    global_backbone: str | None = None            # global encoder on the glance (default: same as backbone)
    backbone_cfg: dict = field(default_factory=dict)
    global_cfg: dict | None = None                # default: backbone_cfg
    input_size: int = 128                         # the image side the model is built for (MAC tables, export)
    glance_size: int = 32                         # side of the down-sampled whole image
    patch_size: int = 32                          # side of a full-resolution patch
    num_steps: int = 4                            # 1 glance + (num_steps - 1) focus steps
    feature_dim: int = 128                        # step feature fed to both GRUs
    hidden_dim: int = 64                          # classifier GRU
    policy_dim: int = 64                          # policy GRU
    std: float = 0.1                              # Gaussian policy std in training (PPO)

    def __post_init__(self):
        for name in ("input_size", "glance_size", "patch_size", "feature_dim", "hidden_dim", "policy_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"GFNet: {name} must be a positive integer, got {getattr(self, name)}")
        if self.patch_size > self.input_size:
            raise ValueError(f"GFNet: patch_size {self.patch_size} is larger than the {self.input_size}x"
                             f"{self.input_size} image; expected patch_size <= input_size")
        if self.glance_size > self.input_size:
            raise ValueError(f"GFNet: glance_size {self.glance_size} is larger than the input size "
                             f"{self.input_size}; the glance is a down-sampled image (glance_size <= input_size)")
        if self.num_steps < 2:
            raise ValueError(f"GFNet: num_steps must be >= 2 (one glance, then focus steps), got {self.num_steps}")
        if not self.std > 0:
            raise ValueError(f"GFNet: std must be > 0, got {self.std}")


class GRUStep(nn.Module):
    """One step of ``nn.GRU`` on (N, input) -> (N, hidden): exported to ONNX as a single ``GRU`` op (a hand-made
    cell from Linear layers is ~15 small nodes, each a per-call overhead at batch 1); FlopCounterMode counts its
    two matrix products, so the ledger measures it like any layer."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.gru = nn.GRU(input_size, hidden_size)

    def forward(self, x: Tensor, h: Tensor | None) -> Tensor:
        """``h`` None: a zero state (the exported glance then needs no zeros built from the batch's shape)."""
        return self.gru(x.unsqueeze(0), None if h is None else h.unsqueeze(0))[1].squeeze(0)


class Encoder(nn.Module):
    """A zoo backbone's ``forward_features``, global average pool, and a projection to ``feature_dim``."""

    def __init__(self, backbone: nn.Module, feature_dim: int):
        super().__init__()
        if not hasattr(backbone, "forward_features"):
            raise ValueError(f"GFNet encoders need a dyncnn backbone with forward_features, got "
                             f"{type(backbone).__name__}")
        self.backbone = backbone
        self.proj = nn.Linear(int(backbone.num_features), feature_dim)

    def forward_map(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(feature (N, feature_dim), the backbone's last feature map): the map feeds the policy's locator."""
        fmap = self.backbone.forward_features(x)
        return self.proj(F.adaptive_avg_pool2d(fmap, 1).flatten(1)), fmap

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_map(x)[0]


class ActorCritic(nn.Module):
    """The recurrent patch policy. ``locate`` (run inside every step but the last, on the detached feature map) is
    a 1x1 saliency convolution and a soft-argmax: where in the image the step's evidence is, (row, col) in [0, 1]
    -- a pooled feature alone keeps almost no position. The GRU reads [feature, where]; the actor gives the next
    patch centre in (0, 1)^2 (with a linear skip from ``where``, so "look where the evidence is" is easy to
    learn), the critic a value for PPO. The GRU part runs only for samples that go on to another step."""

    def __init__(self, feature_dim: int, map_channels: int, hidden: int):
        super().__init__()
        self.saliency = nn.Conv2d(map_channels, 1, 1)
        self.rnn = GRUStep(feature_dim + 2, hidden)
        self.actor = nn.Linear(hidden, 2)
        self.skip = nn.Linear(2, 2)
        self.critic = nn.Linear(hidden, 1)

    def locate(self, fmap: Tensor, origin: Tensor | None = None, extent: float = 1.0) -> Tensor:
        """Soft-argmax of the saliency over ``fmap`` in image coordinates: ``origin + extent * (row, col)``, where
        the map covers the window [origin, origin + extent] of the image (fractions of its side)."""
        h, w = int(fmap.shape[-2]), int(fmap.shape[-1])      # static: constant grids in the ONNX graph
        attn = torch.softmax(self.saliency(fmap.detach()).flatten(1), dim=1)          # (N, h*w)
        ys = (torch.arange(h, dtype=fmap.dtype, device=fmap.device) + 0.5) / h
        xs = (torch.arange(w, dtype=fmap.dtype, device=fmap.device) + 0.5) / w
        grid = torch.stack([ys[:, None].expand(h, w), xs[None, :].expand(h, w)], dim=-1).reshape(h * w, 2)
        where = attn @ grid
        return where if origin is None else origin + extent * where

    def forward(self, feat: Tensor, where: Tensor, hp: Tensor) -> tuple[Tensor, Tensor]:
        """(next centre mean (N, 2), new hidden state)."""
        hp = self.rnn(torch.cat([feat.detach(), where.detach()], dim=1), hp)
        return torch.sigmoid(self.actor(hp) + self.skip(where.detach())), hp

    def value(self, hp: Tensor) -> Tensor:
        return self.critic(hp).squeeze(1)


def _downsample(x: Tensor, size: int) -> Tensor:
    """The glance: 2x2 area averaging while the side halves evenly and stays >= ``size`` (no aliasing of thin
    strokes), then bilinear for what is left (e.g. 128 -> 64 -> 48, 224 -> 112 -> 96). ONNX-exportable."""
    h = x.shape[-1]
    while h % 2 == 0 and h // 2 >= size and x.shape[-2] == x.shape[-1]:
        x, h = F.avg_pool2d(x, 2), h // 2
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def traceable_corners(center: Tensor, side: int, size: int) -> Tensor:
    """``dynamic.patches.patch_corners`` for square images in ops that export to ONNX (Clip, Mul, Round half to
    even): the same integer corners (N, 2) (top, left), held as float (exact: they are small integers)."""
    return torch.round(center.float().clamp(0, 1) * (side - size))


def gather_patches(images: Tensor, corners: Tensor, size: int) -> Tensor:
    """``crop_patches`` at ``corners`` (from :func:`traceable_corners`) as one gather of flat pixel indices
    (ONNX GatherElements): flat start ``top * W + left`` plus a constant offset grid, so the exported focus step
    crops inside its graph in a handful of nodes and the driver makes one call per step."""
    c, h, w = (int(v) for v in images.shape[1:])         # static: constants in the graph, no shape arithmetic
    offs = torch.arange(size, device=images.device)
    grid = ((torch.arange(c, device=images.device) * (h * w))[:, None, None] + offs[:, None] * w + offs)
    start = (corners * torch.tensor([float(w), 1.0], device=corners.device)).sum(1, keepdim=True).long()
    idx = start + grid.reshape(1, c * size * size)                                   # (N, C*P*P)
    return torch.gather(images.reshape(-1, c * h * w), 1, idx).reshape(-1, c, size, size)


class GFNet(nn.Module):
    """See the module docstring. ``train_stage`` (1, 2, 3) selects what training mode does and what is frozen;
    it is set by the training recipe (:mod:`dyncnn.train.recipes.glance`) and does not affect inference."""

    def __init__(self, cfg: GFNetConfig, num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        self.cfg, self.num_classes, self.in_chans = cfg, num_classes, in_chans
        self.default_input_shape = (in_chans, cfg.input_size, cfg.input_size)
        gname = cfg.global_backbone or cfg.backbone
        gcfg = dict(cfg.backbone_cfg if cfg.global_cfg is None else cfg.global_cfg)
        self.global_encoder = Encoder(create_model(gname, num_classes=num_classes, in_chans=in_chans, **gcfg),
                                      cfg.feature_dim)
        self.local_encoder = Encoder(create_model(cfg.backbone, num_classes=num_classes, in_chans=in_chans,
                                                  **dict(cfg.backbone_cfg)), cfg.feature_dim)
        for enc, side, what in ((self.global_encoder, cfg.glance_size, "glance_size"),
                                (self.local_encoder, cfg.patch_size, "patch_size")):
            need = getattr(enc.backbone, "min_input_size", 1)
            if side < need:
                raise ValueError(f"GFNet: {what} {side} is below the backbone's minimum input {need}")
        self.classifier_rnn = GRUStep(cfg.feature_dim, cfg.hidden_dim)
        self.classifier_fc = nn.Linear(cfg.hidden_dim, num_classes)
        if int(self.global_encoder.backbone.num_features) != int(self.local_encoder.backbone.num_features):
            raise ValueError("GFNet: the global and local backbones must have the same number of output channels "
                             "(the policy's locator reads both feature maps)")
        self.policy = ActorCritic(cfg.feature_dim, int(self.local_encoder.backbone.num_features), cfg.policy_dim)
        self.executor = Executor()
        self.train_stage = 1
        self._steps = [partial(self._run_step, k) for k in range(cfg.num_steps)]

    # -- structure ---------------------------------------------------------------------------------------------
    @property
    def num_exits(self) -> int:
        return self.cfg.num_steps

    @property
    def num_steps(self) -> int:
        return self.cfg.num_steps

    def encoders(self) -> list[nn.Module]:
        return [self.global_encoder, self.local_encoder]

    def classifier_modules(self) -> list[nn.Module]:
        return [self.classifier_rnn, self.classifier_fc]

    def init_encoders_from(self, backbone: nn.Module) -> None:
        """Start both encoders from a trained static backbone of the same architecture, as GFNet starts from
        ImageNet-pretrained networks: a local encoder trained from scratch on random patches (mostly background)
        learns little, and the classifier then ignores the focus steps."""
        state = backbone.state_dict()
        for enc in self.encoders():
            enc.backbone.load_state_dict(state)

    def set_train_stage(self, stage: int) -> None:
        """Stage 1: encoders + classifier learn on random patches; 2: only the policy learns (PPO, after a
        supervised warm-start where the data gives object positions); 3: the local encoder and the classifier
        are fine-tuned on the patches the learned policy picks (as the paper's stage III; the global encoder stays
        fixed so the policy's locator keeps reading the features it was trained on). Frozen encoders keep their
        BatchNorm statistics (eval mode)."""
        if stage not in (1, 2, 3):
            raise ValueError(f"train stage must be 1, 2 or 3, got {stage}")
        self.train_stage = stage
        trainable = {1: self.encoders() + self.classifier_modules(), 2: [self.policy],
                     3: [self.local_encoder] + self.classifier_modules()}[stage]
        for p in self.parameters():
            p.requires_grad_(False)
        for m in trainable:
            for p in m.parameters():
                p.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.train_stage >= 2:
            for enc in self.encoders():
                if not (self.train_stage == 3 and enc is self.local_encoder):
                    enc.eval()
        return self

    # -- one step ----------------------------------------------------------------------------------------------
    def check_input(self, x: Tensor) -> Tensor:
        if is_exporting():
            return x
        check_image_batch(x, self.in_chans)
        p = self.cfg.patch_size
        if min(x.shape[-2:]) < p:
            raise DyncnnError(f"GFNet: patch size {p} is larger than the {x.shape[-2]}x{x.shape[-1]} input; expected "
                             f"images of at least {p}x{p} (built for {self.cfg.input_size}x{self.cfg.input_size})")
        return x

    def glance_features(self, x: Tensor) -> Tensor:
        return self.global_encoder(_downsample(x, self.cfg.glance_size))

    def focus_features(self, patch: Tensor) -> Tensor:
        return self.local_encoder(patch)

    def classify(self, feat: Tensor, h: Tensor | None) -> tuple[Tensor, Tensor]:
        h = self.classifier_rnn(feat, h)
        return self.classifier_fc(h), h

    def patch_origin(self, center: Tensor, side: int) -> Tensor:
        """Top-left corners of the patches at ``center`` as fractions of the image side (the exact integer
        corners ``crop_patches`` uses)."""
        return traceable_corners(center, side, self.cfg.patch_size).to(center.dtype) / side

    def glance_step(self, image: Tensor, h: Tensor | None, locate: bool = True) -> dict:
        """Step 1: global encoder on the down-sampled image, classifier, and where the evidence is."""
        feat, fmap = self.global_encoder.forward_map(_downsample(image, self.cfg.glance_size))
        logits, h = self.classify(feat, h)
        out = {"logits": logits, "h": h, "feat": feat}
        if locate:
            out["where"] = self.policy.locate(fmap)
        return out

    def focus_step(self, patch: Tensor, h: Tensor, origin: Tensor | None, side: int) -> dict:
        """A focus step on cropped patches whose corners are ``origin`` (None: the last step, nothing to locate)."""
        feat, fmap = self.local_encoder.forward_map(patch)
        logits, h = self.classify(feat, h)
        out = {"logits": logits, "h": h, "feat": feat}
        if origin is not None:
            out["where"] = self.policy.locate(fmap, origin, self.cfg.patch_size / side)
        return out

    def initial_state(self, x: Tensor) -> dict:
        n = x.shape[0]
        return {"image": x, "h": x.new_zeros(n, self.cfg.hidden_dim), "hp": x.new_zeros(n, self.cfg.policy_dim)}

    def _run_step(self, k: int, state: dict) -> dict:
        """Step ``k`` on the rows still running: for a focus step the policy first picks the centre from the
        previous step's feature and location (so it runs only for samples that did not exit), then the patch is
        cropped, encoded and classified. Inference is deterministic (the policy's mean)."""
        x = state["image"]
        last = k == self.cfg.num_steps - 1
        if k == 0:
            out = self.glance_step(x, state["h"])
            out["hp"] = state["hp"]
        else:
            center, hp = self.policy(state["feat"], state["where"], state["hp"])
            side = x.shape[-1]
            out = self.focus_step(crop_patches(x, center, self.cfg.patch_size), state["h"],
                                  None if last else self.patch_origin(center, side), side)
            out["hp"], out["center"] = hp, center
        out["image"] = x
        if last:
            out.pop("feat", None)
        return out

    # -- training forward --------------------------------------------------------------------------------------
    def forward(self, x: Tensor, centers: Tensor | None = None) -> list[Tensor]:
        """Per-step logits. Training stage 1 looks at uniformly random patches (or at ``centers`` (N, T-1, 2) when
        given); otherwise the policy's mean."""
        x = self.check_input(x)
        n, side, outs = x.shape[0], x.shape[-1], []
        h, hp = x.new_zeros(n, self.cfg.hidden_dim), x.new_zeros(n, self.cfg.policy_dim)
        random = self.training and self.train_stage == 1
        s = self.glance_step(x, h, locate=not random and centers is None)
        outs.append(s["logits"])
        for k in range(1, self.cfg.num_steps):
            if centers is not None:
                center = centers[:, k - 1]
            elif random:
                center = torch.rand(n, 2, device=x.device)
            else:
                center, hp = self.policy(s["feat"], s["where"], hp)
            last = k == self.cfg.num_steps - 1 or random or centers is not None
            s = self.focus_step(crop_patches(x, center, self.cfg.patch_size), s["h"],
                                None if last else self.patch_origin(center, side), side)
            outs.append(s["logits"])
        return outs

    @torch.no_grad()
    def patch_centers(self, x: Tensor) -> Tensor:
        """The centres (N, num_steps - 1, 2), (row, col) in [0, 1], of the patches the policy looks at in steps
        2..T at inference (its mean), whatever step a sample would exit at: for plots and analysis."""
        x = self.check_input(x)
        was_training = self.training
        self.eval()
        try:
            state, out = self.initial_state(x), []
            for k, step in enumerate(self._steps):
                state = step(state)
                if k:
                    out.append(state["center"])
            return torch.stack(out, dim=1)
        finally:
            self.train(was_training)

    # -- executed early exit -----------------------------------------------------------------------------------
    def _coerce_policy(self, policy) -> ExitPolicy:
        return as_policy(policy, self.num_exits, "step")

    @torch.no_grad()
    def infer(self, x: Tensor, policy: ExitPolicy | Sequence[float] | None = None) -> ExitResult:
        """Glance, then focus step by step; after each step the samples confident enough under ``policy`` (an
        ExitPolicy or max-probability thresholds, one per step but the last; None: every step) leave the batch.
        ``exit_index`` is the step each sample stopped at (0 = the glance), ``macs`` the MACs it really ran."""
        x = self.check_input(x)
        policy = self._coerce_policy(policy)
        if self.training:     # never switch a shared model to eval and back (see MultiExitNetwork.infer)
            return eval_copy(self).infer(x, policy)
        heads = [_logits_of] * self.num_exits
        return early_exit_inference(self._steps, heads, self.initial_state(x), policy, self.executor,
                                    self.num_classes)

    @torch.no_grad()
    def step_macs(self, x: Tensor) -> list[int]:
        """Per-sample MACs of each step (FlopCounterMode on one sample)."""
        x = self.check_input(x)
        was_training = self.training
        self.eval()
        try:
            state, out = self.initial_state(x[:1]), []
            for step in self._steps:
                out.append(measure_macs(step, state))
                state = step(state)
            return out
        finally:
            self.train(was_training)

    def exit_macs(self, x: Tensor) -> list[int]:
        """Cumulative MACs per sample of stopping after each step (the MSDNet protocol's exit costs)."""
        out, total = [], 0
        for m in self.step_macs(x):
            total += m
            out.append(total)
        return out

    def full_macs(self, x: Tensor) -> int:
        return self.exit_macs(x)[-1]



def _logits_of(state: dict) -> Tensor:
    return state["logits"]


def gfnet(num_classes: int = 10, in_chans: int = 1, **cfg) -> GFNet:
    """Build a GFNet from ``GFNetConfig`` fields (``backbone``, ``patch_size``, ``num_steps``, ...)."""
    known = set(GFNetConfig.__dataclass_fields__)
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"GFNet: unknown options {unknown}; expected some of {sorted(known)}")
    return GFNet(GFNetConfig(**cfg), num_classes=num_classes, in_chans=in_chans)


def _imagenet(backbone: str, patch: int, steps: int, num_classes: int, in_chans: int, cfg: dict) -> GFNet:
    base = {"backbone": backbone, "input_size": 224, "glance_size": patch, "patch_size": patch, "num_steps": steps,
            "feature_dim": 1024, "hidden_dim": 1024, "policy_dim": 256}
    return gfnet(num_classes, in_chans, **{**base, **cfg})


@register_model(name="gfnet_mobilenet_v3_large",
                published={"input_size": 224, "note": "GFNet (Wang et al. 2020), MobileNetV3-L, 96x96 patches"})
def gfnet_mobilenet_v3_large(num_classes: int = 1000, in_chans: int = 3, **cfg) -> GFNet:
    return _imagenet("mobilenet_v3_large", 96, 5, num_classes, in_chans, cfg)


@register_model(name="gfnet_resnet50",
                published={"input_size": 224, "note": "GFNet (Wang et al. 2020), ResNet-50, 96x96 patches"})
def gfnet_resnet50(num_classes: int = 1000, in_chans: int = 3, **cfg) -> GFNet:
    return _imagenet("resnet50", 96, 5, num_classes, in_chans, cfg)


@register_model(name="gfnet_densenet121",
                published={"input_size": 224, "note": "GFNet (Wang et al. 2020), DenseNet-121, 96x96 patches"})
def gfnet_densenet121(num_classes: int = 1000, in_chans: int = 3, **cfg) -> GFNet:
    return _imagenet("densenet121", 96, 5, num_classes, in_chans, cfg)


@register_model(name="gfnet_tiny_mnist")
def gfnet_tiny_mnist(num_classes: int = 10, in_chans: int = 1, **cfg) -> GFNet:
    """For large-canvas ScaledMNIST (128x128): tiny_mobilenet encoders, a 64x64 glance of the whole image (2x2
    average pooling: no resize node), 40x40 full-resolution patches, 3 steps (full depth about 0.45 of the MACs
    of the same backbone on the 128x128 image)."""
    base = {"backbone": "tiny_mobilenet", "backbone_cfg": {"widths": [16, 32, 64, 128]}, "input_size": 128,
            "glance_size": 64, "patch_size": 40, "num_steps": 3}
    return gfnet(num_classes, in_chans, **{**base, **cfg})


@register_model(name="gfnet")
def gfnet_custom(num_classes: int = 10, in_chans: int = 1, **cfg) -> GFNet:
    """Any GFNet by its config fields, e.g. ``create_model("gfnet", backbone="resnet20_cifar", patch_size=16)``."""
    return gfnet(num_classes, in_chans, **cfg)

