"""AdaFocus (Wang et al., ICCV 2021; V2, CVPR 2022) and the video baselines it is compared with.

Most of a video's pixels and frames carry nothing: AdaFocus glances at every frame with a light global network at
low resolution, a recurrent policy picks one patch per frame from that glance, a heavier local network processes
only the patch, and a recurrent classifier fuses (glance, patch) features over time, giving logits after every
frame. Early exit over time stops reading frames once the classifier is confident (thresholds calibrated with the
MSDNet protocol of :mod:`dyncnn.dynamic.budget`, frames being the exits).

Execution, not simulation: :meth:`AdaFocus.infer` runs frame by frame; at frame t the glance, the policy, the
local network and the classifier run only for the clips still being read (exited clips leave the batch), each
stage through the :class:`~dyncnn.dynamic.executor.Executor`, so the per-sample ledger is what really ran. In
training, ``forward`` handles the whole (N * T) batch of frames at once (one glance call, one crop, one local
call); only the two small recurrent cells step over time.

Patch selection: ``policy="ppo"`` is AdaFocus V1 (a Gaussian policy trained by PPO in stage 2 of
:func:`dyncnn.train.recipes.temporal.fit_adafocus`); ``policy="differentiable"`` is AdaFocusV2 (the patch is
cropped by bilinear sampling in training so gradients reach the patch centre; the exact crop at inference).

Baselines: :class:`FrameAverage` runs the local backbone on full frames, every frame or ``k`` uniformly sampled
ones, and averages the features over time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dynamic.executor import CostLedger, ExitResult, Executor, eval_copy, measure_macs
from ..dynamic.exits import as_policy
from ..dynamic.patches import crop_patches, crop_patches_differentiable
from ..dynamic.policy import ExitPolicy
from ..errors import DyncnnError
from .base import is_exporting
from .registry import create_model, register_model

POLICIES = ("ppo", "differentiable")
TRAIN_MODES = ("random", "gaussian", "mean", "differentiable")


def check_clips(x: object, frames: int, in_chans: int, min_size: int = 1, *, name: str = "clips") -> Tensor:
    """Validate a batch of clips (N, T, C, H, W): float, T == ``frames``, C == ``in_chans``, N >= 1, finite."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (N, T, C, H, W), got {type(x).__name__}")
    if x.dim() != 5:
        hint = " (add a batch axis with x.unsqueeze(0))" if x.dim() == 4 else ""
        raise DyncnnError(f"{name}: expected a 5-D batch of clips (N, T={frames}, C={in_chans}, H, W), got shape "
                          f"{tuple(x.shape)}{hint}")
    n, t, c, h, w = x.shape
    if n == 0:
        raise DyncnnError(f"{name}: expected a non-empty batch (N >= 1), got shape {tuple(x.shape)}")
    if t != frames:
        raise DyncnnError(f"{name}: expected {frames} frames per clip, got {t} (shape {tuple(x.shape)})")
    if c != in_chans:
        raise DyncnnError(f"{name}: expected {in_chans} channels, got {c} (shape {tuple(x.shape)})")
    if min(h, w) < min_size:
        raise DyncnnError(f"{name}: frames of {h}x{w} are smaller than the {min_size}x{min_size} patch / input "
                          f"the model needs")
    if not x.is_floating_point():
        raise DyncnnError(f"{name}: expected a floating-point tensor, got {x.dtype}; convert with x.float() / 255")
    if not bool(torch.isfinite(x).all()):
        raise DyncnnError(f"{name}: expected finite values, got {int((~torch.isfinite(x)).sum())} NaN/Inf entries")
    return x


class PooledFeatures(nn.Module):
    """A zoo backbone's ``forward_features`` followed by global average pooling, optionally on a resized input
    (the glance network sees frames at ``size`` x ``size``)."""

    def __init__(self, backbone: nn.Module, size: int | None = None):
        super().__init__()
        self.backbone, self.size = backbone, size
        self.num_features = int(backbone.num_features)

    def forward(self, x: Tensor) -> Tensor:
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.adaptive_avg_pool2d(x, self.size)
        return self.backbone.forward_features(x).mean((2, 3))


class Actor(nn.Module):
    """Recurrent patch policy: GRU over the glance features, a sigmoid head giving the patch centre (row, col)."""

    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.gru = nn.GRUCell(in_features, hidden)
        self.head = nn.Linear(hidden, 2)
        self.hidden = hidden
        nn.init.zeros_(self.head.weight)      # start at the frame centre
        nn.init.zeros_(self.head.bias)

    def forward(self, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        g, h = state
        h = self.gru(g, h)
        return torch.sigmoid(self.head(h)), h


class RecurrentClassifier(nn.Module):
    """GRU over the concatenated (glance, patch) features; logits after every step."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.gru = nn.GRUCell(in_features, hidden)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(hidden, num_classes)
        self.hidden = hidden

    def forward(self, state: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        g, l, h = state
        h = self.gru(torch.cat([g, l], dim=1), h)
        return self.fc(self.drop(h)), h


@dataclass
class AdaFocusResult(ExitResult):
    """:class:`ExitResult` plus the patch centres (N, T, 2) used per frame (NaN for frames not read).
    ``exit_index`` is the 0-based step each clip left at (frames read = exit_index + 1); ``choices`` (N, T) is
    1 for the frames read."""
    centers: Tensor | None = None


class AdaFocus(nn.Module):
    """Glance (all frames, low resolution) -> policy (patch per frame) -> focus (local network on the patch) ->
    recurrent classifier; see the module docstring. Training ``forward`` returns a list of T logits (one per
    frame, the exits over time); so does eval ``forward`` (the executed deterministic policy on every frame).
    ``frame_size`` is only the frame side it is profiled at (``default_input_shape``); it takes any size."""

    input_kind = "clip"

    def __init__(self, global_net: nn.Module, local_net: nn.Module, num_classes: int, in_chans: int = 1,
                 frames: int = 16, patch_size: int = 32, glance_size: int = 32, policy: str = "ppo",
                 policy_hidden: int = 64, hidden: int = 128, std: float = 0.1, drop_rate: float = 0.0,
                 frame_size: int = 64):
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"unknown patch policy {policy!r}; expected one of {POLICIES}")
        if frames < 1 or patch_size < 1 or glance_size < 1:
            raise ValueError(f"frames, patch_size and glance_size must be >= 1, got {frames}, {patch_size}, "
                             f"{glance_size}")
        self.num_classes, self.in_chans, self.frames = num_classes, in_chans, frames
        self.default_input_shape = (frames, in_chans, frame_size, frame_size)
        self.patch_size, self.glance_size, self.policy, self.std = patch_size, glance_size, policy, std
        self.glance = PooledFeatures(global_net, glance_size)
        self.local = PooledFeatures(local_net)
        self.actor = Actor(self.glance.num_features, policy_hidden)
        self.critic = nn.Linear(policy_hidden, 1)            # PPO's value function, training only
        self.classifier = RecurrentClassifier(self.glance.num_features + self.local.num_features, hidden,
                                              num_classes, drop_rate)
        self.executor = Executor()
        # How training forward picks patches: "random" (stage 1), "gaussian" (PPO rollouts), "mean" (stage 3),
        # "differentiable" (AdaFocusV2). Inference always uses the policy's mean and the exact crop.
        self.train_mode = "differentiable" if policy == "differentiable" else "random"

    @property
    def num_exits(self) -> int:
        return self.frames

    def policy_parameters(self) -> list[nn.Parameter]:
        return [*self.actor.parameters(), *self.critic.parameters()]

    def check_input(self, x: Tensor) -> Tensor:
        if is_exporting():
            return x
        return check_clips(x, self.frames, self.in_chans, self.patch_size)

    # -- training / dense path: all frames of the batch at once ------------------------------------------------
    def actor_sequence(self, g: Tensor) -> tuple[Tensor, Tensor]:
        """Patch-centre means (N, T, 2) and critic values (N, T) from glance features g (N, T, D)."""
        n, t, _ = g.shape
        h = g.new_zeros(n, self.actor.hidden)
        means, values = [], []
        for k in range(t):
            m, h = self.actor((g[:, k], h))
            means.append(m)
            values.append(self.critic(h).squeeze(1))
        return torch.stack(means, 1), torch.stack(values, 1)

    def classify_sequence(self, g: Tensor, l: Tensor) -> list[Tensor]:
        n, t, _ = g.shape
        h = g.new_zeros(n, self.classifier.hidden)
        out = []
        for k in range(t):
            logits, h = self.classifier((g[:, k], l[:, k], h))
            out.append(logits)
        return out

    def forward(self, x: Tensor) -> list[Tensor]:
        mode = self.train_mode if self.training else "mean"
        return self.dense(x, mode)[0]

    def dense(self, x: Tensor, mode: str = "mean") -> tuple[list[Tensor], dict | None]:
        """Every frame of every clip, all (N * T) frames per network call. Returns the T per-step logits and, for
        ``mode="gaussian"`` (PPO rollouts), what PPO needs: glance features, sampled (unclipped) actions, means,
        critic values."""
        if mode not in TRAIN_MODES:
            raise ValueError(f"unknown train_mode {mode!r}; expected one of {TRAIN_MODES}")
        x = self.check_input(x)
        n, t = x.shape[:2]
        frames = x.flatten(0, 1)
        g = self.glance(frames).view(n, t, -1)
        rollout = None
        if mode == "random":
            centers = torch.rand(n, t, 2, device=x.device)
        else:
            means, values = self.actor_sequence(g.detach() if mode == "gaussian" else g)
            centers = means
            if mode == "gaussian":     # sample around the mean (std 0.1 as in GFNet), clip into the frame
                raw = means + self.std * torch.randn_like(means)
                centers = raw.clamp(0, 1)
                rollout = {"glance": g.detach(), "actions": raw.detach(), "means": means.detach(),
                           "values": values.detach()}
        crop = crop_patches_differentiable if mode == "differentiable" else crop_patches
        patches = crop(frames, centers.reshape(n * t, 2), self.patch_size)
        l = self.local(patches).view(n, t, -1)
        return self.classify_sequence(g, l), rollout

    # -- executed inference: frame by frame, exited clips leave the batch ------------------------------------
    @torch.no_grad()
    def infer(self, x: Tensor, policy: ExitPolicy | Sequence[float] | None = None) -> AdaFocusResult:
        """Read frames one at a time; after frame t, clips whose confidence meets threshold t stop. Returns
        logits, the step each clip left at, the MACs it ran, the frames read (choices) and the patch centres."""
        x = self.check_input(x)
        policy = as_policy(policy, self.num_exits, "frame")
        if self.training:     # never switch a shared model to eval and back (see MultiExitNetwork.infer)
            return eval_copy(self).infer(x, policy)
        return self._infer(x, policy)

    def _infer(self, x: Tensor, policy: ExitPolicy) -> AdaFocusResult:
        n, t = x.shape[:2]
        ex, ledger = self.executor, CostLedger(n)
        rows = torch.arange(n)
        hp = x.new_zeros(n, self.actor.hidden)
        hc = x.new_zeros(n, self.classifier.hidden)
        logits_out = x.new_zeros(n, self.num_classes)
        exit_index = torch.full((n,), t - 1, dtype=torch.int64)
        read = torch.zeros(n, t)
        centers_out = torch.full((n, t, 2), float("nan"))
        for k in range(t):
            frame = x[rows.to(x.device), k]                          # only the clips still being read
            g = ex.run(self.glance, frame, rows, ledger)
            center, hp = ex.run(self.actor, (g, hp), rows, ledger)
            l = ex.run(self.local, crop_patches(frame, center, self.patch_size), rows, ledger)
            logits, hc = ex.run(self.classifier, (g, l, hc), rows, ledger)
            read[rows, k] = 1
            centers_out[rows, k] = center.float().cpu()
            done = policy(k, logits) if k < t - 1 else torch.ones(len(rows), dtype=torch.bool)
            done_cpu = done.cpu()
            logits_out[rows[done_cpu].to(x.device)] = logits[done.to(logits.device)]
            exit_index[rows[done_cpu]] = k
            if bool(done_cpu.all()):
                break
            keep = ~done_cpu
            rows, hp, hc = rows[keep], hp[keep.to(hp.device)], hc[keep.to(hc.device)]
        return AdaFocusResult(logits_out, exit_index, ledger.macs, read, centers=centers_out)

    @torch.no_grad()
    def step_macs(self, x: Tensor) -> int:
        """MACs per clip of reading one frame (glance + policy + local network + classifier)."""
        was_training = self.training
        self.eval()
        try:
            frame = x[:1, 0]
            g = self.glance(frame)
            hp = g.new_zeros(1, self.actor.hidden)
            center, _ = self.actor((g, hp))
            patch = crop_patches(frame, center, self.patch_size)
            l = self.local(patch)
            hc = g.new_zeros(1, self.classifier.hidden)
            return (measure_macs(self.glance, frame) + measure_macs(self.actor, (g, hp))
                    + measure_macs(self.local, patch) + measure_macs(self.classifier, (g, l, hc)))
        finally:
            self.train(was_training)

    def exit_macs(self, x: Tensor) -> list[int]:
        """Cumulative MACs per clip of leaving after frame t = 1..T (every step costs the same)."""
        x = self.check_input(x)
        step = self.step_macs(x)
        return [step * (k + 1) for k in range(self.frames)]

    def full_macs(self, x: Tensor) -> int:
        return self.exit_macs(x)[-1]


class FrameAverage(nn.Module):
    """Baseline: the backbone on full frames (all T, or ``sample_frames`` uniformly spaced ones), features
    averaged over time, the backbone's own head. Static: every clip costs the same."""

    input_kind = "clip"

    def __init__(self, backbone: nn.Module, num_classes: int, in_chans: int = 1, frames: int = 16,
                 sample_frames: int | None = None, frame_size: int = 64):
        super().__init__()
        k = frames if sample_frames is None else int(sample_frames)
        if not 1 <= k <= frames:
            raise ValueError(f"sample_frames must be in [1, {frames}], got {sample_frames}")
        self.backbone, self.num_classes, self.in_chans, self.frames = backbone, num_classes, in_chans, frames
        self.default_input_shape = (frames, in_chans, frame_size, frame_size)
        # the centre frame of each of k equal segments (TSN's uniform sampling at test time)
        self.register_buffer("frame_index", torch.tensor([int((i + 0.5) * frames / k) for i in range(k)]),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not is_exporting():
            check_clips(x, self.frames, self.in_chans, getattr(self.backbone, "min_input_size", 1))
        n, k = x.shape[0], len(self.frame_index)
        feats = self.backbone.forward_features(x[:, self.frame_index].flatten(0, 1))
        feats = feats.view(n, k, *feats.shape[1:]).mean(1)           # temporal average pooling
        return self.backbone.forward_head(feats)


# -- registered builders -------------------------------------------------------------------------------------

TINY_GLOBAL = {"widths": [8, 16, 32]}
TINY_LOCAL = {"widths": [16, 32, 64, 128]}


def _backbone(name: str, cfg: dict | None, in_chans: int) -> nn.Module:
    return create_model(name, num_classes=1, in_chans=in_chans, **dict(cfg or {}))


@register_model(name="adafocus_tiny")
def adafocus_tiny(num_classes: int = 10, in_chans: int = 1, frames: int = 16, patch_size: int = 32,
                  glance_size: int = 32, policy: str = "ppo", global_model: str = "tiny_mobilenet",
                  global_cfg: dict | None = None, local_model: str = "tiny_mobilenet", local_cfg: dict | None = None,
                  **kwargs) -> AdaFocus:
    """AdaFocus on two tiny depthwise-separable zoo networks, for MovingDigits (64x64 frames, 32x32 patches)."""
    return AdaFocus(_backbone(global_model, global_cfg or TINY_GLOBAL, in_chans),
                    _backbone(local_model, local_cfg or TINY_LOCAL, in_chans), num_classes, in_chans, frames,
                    patch_size, glance_size, policy, **kwargs)


@register_model(name="adafocus_mobilenet_v2")
def adafocus_mobilenet_v2(num_classes: int = 400, in_chans: int = 3, frames: int = 16, patch_size: int = 128,
                          glance_size: int = 96, policy: str = "ppo", **kwargs) -> AdaFocus:
    """The published pairing: MobileNetV2 as the local network, a small MobileNetV3 glancing at low resolution."""
    kwargs.setdefault("frame_size", 224)
    return AdaFocus(_backbone("mobilenet_v3_small", {}, in_chans), _backbone("mobilenet_v2", {}, in_chans),
                    num_classes, in_chans, frames, patch_size, glance_size, policy, **kwargs)


@register_model(name="adafocus_baseline_allframes")
def adafocus_baseline_allframes(num_classes: int = 10, in_chans: int = 1, frames: int = 16,
                                backbone: str = "tiny_mobilenet", backbone_cfg: dict | None = None) -> FrameAverage:
    """Every-frame baseline: the (local) backbone on every full frame, temporal average pooling."""
    cfg = backbone_cfg if backbone_cfg is not None else (TINY_LOCAL if backbone == "tiny_mobilenet" else {})
    return FrameAverage(create_model(backbone, num_classes=num_classes, in_chans=in_chans, **cfg), num_classes,
                        in_chans, frames, frame_size=64 if backbone == "tiny_mobilenet" else 224)


@register_model(name="adafocus_baseline_uniform")
def adafocus_baseline_uniform(num_classes: int = 10, in_chans: int = 1, frames: int = 16, sample_frames: int = 4,
                              backbone: str = "tiny_mobilenet", backbone_cfg: dict | None = None) -> FrameAverage:
    """Uniform frame sampling: the backbone on ``sample_frames`` evenly spaced full frames, averaged."""
    cfg = backbone_cfg if backbone_cfg is not None else (TINY_LOCAL if backbone == "tiny_mobilenet" else {})
    return FrameAverage(create_model(backbone, num_classes=num_classes, in_chans=in_chans, **cfg), num_classes,
                        in_chans, frames, sample_frames, frame_size=64 if backbone == "tiny_mobilenet" else 224)

