"""Glance and Focus (GFNet, Wang et al. 2020): region-level spatially adaptive inference, executed for real.

Step 1 (the *glance*) runs a global encoder on the whole image down-sampled (e.g. 128 -> 32). Each later step
(a *focus*) runs a local encoder on a full-resolution patch (e.g. 32x32) cropped where a recurrent policy points.
A recurrent classifier (a GRU over the step features) gives logits after every step, so GFNet is a multi-exit
network over steps: a confident sample stops after the glance, a hard one (a small digit among clutter) looks at
more patches. The policy is an actor-critic GRU over the detached step features: the actor gives the mean of a
Gaussian over the next patch centre (std 0.1 in training, the mean at test), the critic a value for PPO.

``forward(x)`` returns the per-step logits (a list, as every multi-exit network: training and the budgeted
protocol's ``collect_exit_logits``). ``infer(x, policy)`` is the executed early exit: samples whose step is
confident enough leave the batch (``dynamic.executor.early_exit_inference``), patches are cropped for the
whole batch at once, and each sample is charged the MACs of the steps it ran. ``exit_macs(x)`` gives the
cumulative MACs of stopping after each step, so ``dynamic.budget`` / ``dyncnn calibrate`` / ``eval --budget``
work on GFNet unchanged. The three training stages live in :mod:`dyncnn.dynamic.glance` (``fit_stages``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dynamic.executor import ExitResult, Executor, early_exit_inference, measure_macs
from ..dynamic.patches import crop_patches
from ..dynamic.policy import ExitPolicy
from ..errors import check_image_batch
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


class GRUCell(nn.Module):
    """A GRU cell from two Linear layers: the same maths as ``nn.GRUCell``, exported to ONNX as plain GEMMs and
    counted by FlopCounterMode as two matrix products."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.ih, self.hh = nn.Linear(input_size, 3 * hidden_size), nn.Linear(hidden_size, 3 * hidden_size)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        size = self.hh.in_features      # static split sizes: a constant ONNX Split, not shape arithmetic
        ir, iz, i_n = self.ih(x).split(size, dim=1)
        hr, hz, h_n = self.hh(h).split(size, dim=1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h


class Encoder(nn.Module):
    """A zoo backbone's ``forward_features``, global average pool, and a projection to ``feature_dim``."""

    def __init__(self, backbone: nn.Module, feature_dim: int):
        super().__init__()
        if not hasattr(backbone, "forward_features"):
            raise ValueError(f"GFNet encoders need a dyncnn backbone with forward_features, got "
                             f"{type(backbone).__name__}")
        self.backbone = backbone
        self.proj = nn.Linear(int(backbone.num_features), feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.adaptive_avg_pool2d(self.backbone.forward_features(x), 1).flatten(1))


class ActorCritic(nn.Module):
    """The recurrent patch policy: GRU over detached step features; actor -> patch centre mean in (0, 1)^2."""

    def __init__(self, feature_dim: int, hidden: int):
        super().__init__()
        self.rnn = GRUCell(feature_dim, hidden)
        self.actor = nn.Linear(hidden, 2)
        self.critic = nn.Linear(hidden, 1)

    def forward(self, feat: Tensor, hp: Tensor) -> tuple[Tensor, Tensor]:
        """(next centre mean (N, 2), new hidden state)."""
        hp = self.rnn(feat.detach(), hp)
        return torch.sigmoid(self.actor(hp)), hp

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


class GFNet(nn.Module):
    """See the module docstring. ``train_stage`` (1, 2, 3) selects what training mode does and what is frozen;
    it is set by ``fit_stages`` and does not affect inference."""

    def __init__(self, cfg: GFNetConfig, num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        self.cfg, self.num_classes, self.in_chans = cfg, num_classes, in_chans
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
        self.classifier_rnn = GRUCell(cfg.feature_dim, cfg.hidden_dim)
        self.classifier_fc = nn.Linear(cfg.hidden_dim, num_classes)
        self.policy = ActorCritic(cfg.feature_dim, cfg.policy_dim)
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
        """Stage 1: encoders + classifier learn on random patches; 2: only the policy learns (PPO); 3: only the
        classifier learns, with the learned policy. Frozen parts keep their BatchNorm statistics (eval mode)."""
        if stage not in (1, 2, 3):
            raise ValueError(f"train stage must be 1, 2 or 3, got {stage}")
        self.train_stage = stage
        trainable = {1: self.encoders() + self.classifier_modules(), 2: [self.policy],
                     3: self.classifier_modules()}[stage]
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
                enc.eval()
        return self

    # -- one step ----------------------------------------------------------------------------------------------
    def check_input(self, x: Tensor) -> Tensor:
        if is_exporting():
            return x
        check_image_batch(x, self.in_chans)
        p = self.cfg.patch_size
        if min(x.shape[-2:]) < p:
            raise ValueError(f"GFNet: patch size {p} is larger than the {x.shape[-2]}x{x.shape[-1]} input; expected "
                             f"images of at least {p}x{p} (built for {self.cfg.input_size}x{self.cfg.input_size})")
        return x

    def glance_features(self, x: Tensor) -> Tensor:
        return self.global_encoder(_downsample(x, self.cfg.glance_size))

    def focus_features(self, patch: Tensor) -> Tensor:
        return self.local_encoder(patch)

    def classify(self, feat: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        h = self.classifier_rnn(feat, h)
        return self.classifier_fc(h), h

    def initial_state(self, x: Tensor) -> dict:
        n = x.shape[0]
        return {"image": x, "h": x.new_zeros(n, self.cfg.hidden_dim), "hp": x.new_zeros(n, self.cfg.policy_dim),
                "center": x.new_zeros(n, 2)}

    def _run_step(self, k: int, state: dict) -> dict:
        """Step ``k`` on a batch state: encode (glance or the patch at ``center``), classify, and, unless it is
        the last step, let the policy choose the next centre (the mean: inference is deterministic)."""
        x = state["image"]
        feat = (self.glance_features(x) if k == 0 else
                self.focus_features(crop_patches(x, state["center"], self.cfg.patch_size)))
        logits, h = self.classify(feat, state["h"])
        out = {"image": x, "h": h, "logits": logits}
        if k < self.cfg.num_steps - 1:
            out["center"], out["hp"] = self.policy(feat, state["hp"])
        return out

    # -- training forward --------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> list[Tensor]:
        """Per-step logits. Training stage 1 looks at uniformly random patches; otherwise the policy's mean."""
        x = self.check_input(x)
        n, outs = x.shape[0], []
        h, hp = x.new_zeros(n, self.cfg.hidden_dim), x.new_zeros(n, self.cfg.policy_dim)
        center = None
        for k in range(self.cfg.num_steps):
            feat = (self.glance_features(x) if k == 0 else
                    self.focus_features(crop_patches(x, center, self.cfg.patch_size)))
            logits, h = self.classify(feat, h)
            outs.append(logits)
            if k < self.cfg.num_steps - 1:
                if self.training and self.train_stage == 1:
                    center = torch.rand(n, 2, device=x.device)
                else:
                    center, hp = self.policy(feat, hp)
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
            for step in self._steps[:-1]:
                state = step(state)
                out.append(state["center"])
            return torch.stack(out, dim=1)
        finally:
            self.train(was_training)

    # -- executed early exit -----------------------------------------------------------------------------------
    def _coerce_policy(self, policy) -> ExitPolicy:
        if policy is None:
            return ExitPolicy.never(self.num_exits)
        policy = policy if isinstance(policy, ExitPolicy) else ExitPolicy(list(policy))
        if len(policy.thresholds) not in (self.num_exits - 1, self.num_exits):
            raise ValueError(f"expected {self.num_exits - 1} thresholds (one per step but the last), "
                             f"got {len(policy.thresholds)}")
        return policy

    @torch.no_grad()
    def infer(self, x: Tensor, policy: ExitPolicy | Sequence[float] | None = None) -> ExitResult:
        """Glance, then focus step by step; after each step the samples confident enough under ``policy`` (an
        ExitPolicy or max-probability thresholds, one per step but the last; None: every step) leave the batch.
        ``exit_index`` is the step each sample stopped at (0 = the glance), ``macs`` the MACs it really ran."""
        x = self.check_input(x)
        policy = self._coerce_policy(policy)
        was_training = self.training
        self.eval()
        try:
            heads = [_logits_of] * self.num_exits
            return early_exit_inference(self._steps, heads, self.initial_state(x), policy, self.executor,
                                        self.num_classes)
        finally:
            self.train(was_training)

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

    def export_bundle(self, out_dir, policy=None, check_inputs=(), input_size: int | None = None) -> dict:
        """Staged ONNX graphs (glance, focus, last focus) + manifest; see :mod:`dyncnn.export.glance`."""
        from ..export.glance import export_glance_bundle
        return export_glance_bundle(self, out_dir, input_size=input_size, policy=policy, check_inputs=check_inputs)

    # -- training ----------------------------------------------------------------------------------------------
    def fit_stages(self, train_set, val_set, config, out_dir, resume: bool = False, extra: dict | None = None):
        """The three training stages (see :func:`dyncnn.dynamic.glance.fit_glance_stages`)."""
        from ..dynamic.glance import fit_glance_stages
        return fit_glance_stages(self, train_set, val_set, config, out_dir, resume, extra)


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
    """For large-canvas ScaledMNIST (128x128): tiny_mobilenet encoders, a 48x48 glance of the whole image, 32x32
    full-resolution patches, 4 steps (full depth about 0.4 of the MACs of the same backbone on the 128x128 image)."""
    base = {"backbone": "tiny_mobilenet", "backbone_cfg": {"widths": [16, 32, 64, 128]}, "input_size": 128,
            "glance_size": 48, "patch_size": 32, "num_steps": 4}
    return gfnet(num_classes, in_chans, **{**base, **cfg})


@register_model(name="gfnet")
def gfnet_custom(num_classes: int = 10, in_chans: int = 1, **cfg) -> GFNet:
    """Any GFNet by its config fields, e.g. ``create_model("gfnet", backbone="resnet20_cifar", patch_size=16)``."""
    return gfnet(num_classes, in_chans, **cfg)

