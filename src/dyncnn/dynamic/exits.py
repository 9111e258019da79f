"""Multi-exit networks: intermediate classifiers on any backbone, and cascades of independent models.

``MultiExitNetwork`` holds ``stages`` (state -> state) and ``heads`` (state -> logits). In training,
``forward(x)`` returns the list of every exit's logits. ``infer(x, policy)`` runs the stages through the
conditional executor: samples whose exit is confident enough leave the batch, and each sample's MACs are
recorded. MSDNet and RANet are MultiExitNetworks with their own stages and heads; ``attach_exits`` builds one
from any registered, torchvision or timm backbone by cutting it at chosen modules (``split.split_model``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ..errors import DyncnnError, check_image_batch, param_dtype
from ..layers import ConvNormAct
from .backbone import input_channels, stage_ends
from .executor import (ExitResult, Executor, State, early_exit_inference, eval_copy, measure_macs,
                       module_device)
from .policy import ExitPolicy
from .split import split_model


def as_policy(policy, num_exits: int, unit: str = "exit", error: type[DyncnnError] = DyncnnError) -> ExitPolicy:
    """``policy`` (an ExitPolicy, a sequence of max-probability thresholds, or None for full depth) as an
    ExitPolicy with one threshold per exit but the last (or one per exit); anything else raises ``error`` (a
    DyncnnError), which names the model's ``unit`` of exit ("exit", "step", "frame")."""
    if policy is None:
        return ExitPolicy.never(num_exits)
    policy = ExitPolicy.of(policy)
    if len(policy.thresholds) not in (num_exits - 1, num_exits):
        raise error(f"expected {num_exits - 1} thresholds (one per {unit} but the last), "
                    f"got {len(policy.thresholds)}")
    return policy


class LinearHead(nn.Module):
    """Global average pool + linear classifier on a feature map."""

    def __init__(self, channels: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(self.pool(x).flatten(1)))


class ConvHead(nn.Module):
    """MSDNet's classifier: two 3x3 stride-2 conv-BN-ReLU layers, average pool, linear."""

    def __init__(self, channels: int, num_classes: int, inner: int = 128):
        super().__init__()
        self.convs = nn.Sequential(ConvNormAct(channels, inner, 3, stride=2), ConvNormAct(inner, inner, 3, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inner, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.convs(x)).flatten(1))


class TokenHead(nn.Module):
    """The ``linear`` exit of a transformer block's output (N, tokens, C): layer norm, mean over tokens, linear."""

    def __init__(self, channels: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(self.norm(x).mean(1)))


HEADS: dict[str, Callable[[int, int], nn.Module]] = {"linear": LinearHead, "conv": ConvHead, "msdnet": ConvHead}


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def scale_grad(state, scale: float):
    """``state`` (a pytree) unchanged forward, its gradients multiplied by ``scale`` backward."""
    return tree_map(lambda t: _ScaleGrad.apply(t, scale) if isinstance(t, Tensor) and t.requires_grad else t,
                    state)


def _exit_head(head: str | Callable, shape: torch.Size, num_classes: int, where: str) -> nn.Module:
    """The head for a cut whose feature has ``shape``: a feature map (N, C, H, W) or tokens (N, L, C)."""
    if len(shape) == 3:
        if head == "linear":
            return TokenHead(shape[-1], num_classes)
        if isinstance(head, str):
            raise ValueError(f"head {head!r} needs a feature map (N, C, H, W), but the output of {where!r} is "
                             f"tokens {tuple(shape)}; use head='linear' or a callable (channels = last dim)")
        return head(shape[-1], num_classes)
    if len(shape) != 4:
        raise ValueError(f"cannot attach an exit after {where!r}: its output has shape {tuple(shape)}, expected a "
                         f"feature map (N, C, H, W) or tokens (N, L, C)")
    return (HEADS[head] if isinstance(head, str) else head)(shape[1], num_classes)


class ForwardTransfer(nn.Module):
    """IMTA's forward knowledge transfer into exit k (Li, Huang et al., ICCV 2019, "inline subnetwork
    collaboration"): the previous exit's logits through linear -> BatchNorm -> ReLU -> linear, added to exit k's
    logits. The official code concatenates that feature to the head's pooled feature before the head's classifier;
    a linear layer on a concatenation is the sum of two linear layers, so adding to the logits is the same function
    and works on any head without opening it."""

    def __init__(self, num_classes: int, hidden: int = 128):
        super().__init__()
        self.embed = nn.Linear(num_classes, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.act = nn.ReLU()
        self.fc = nn.Linear(hidden, num_classes, bias=False)   # the head's classifier has the bias

    def forward(self, prev_logits: Tensor) -> Tensor:
        return self.fc(self.act(self.norm(self.embed(prev_logits))))


class TransferStage(nn.Module):
    """Stage k with its exit head inside, for forward knowledge transfer: ``(state, previous logits) -> (stage(state),
    logits)``, the logits being ``head(stage(state)) + transfer(previous logits)`` (stage 0, without a transfer,
    takes the plain initial state). The exit's logits are part of the state that the next stage reads, so the
    early-exit loop, the ledger and the staged bundles need nothing new: the network's heads are
    :class:`ExitLogits`, which read the logits out of the state (0 MACs), and a sample leaving at exit k has run
    stage k and head k, nothing of exit k + 1."""

    def __init__(self, stage: nn.Module, head: nn.Module, transfer: ForwardTransfer | None = None):
        super().__init__()
        self.stage, self.head, self.transfer = stage, head, transfer

    def forward(self, state, grad_scales: tuple[float, float] | None = None) -> tuple:
        """``grad_scales`` (training with gradient equilibrium): the scales of the gradient that flows back into
        the stage's output from this exit's head and from the later exits (see ``MultiExitNetwork.forward``)."""
        inner, prev = state if self.transfer is not None else (state, None)
        out = self.stage(inner)
        to_head, to_next = (scale_grad(out, grad_scales[0]), scale_grad(out, grad_scales[1])) \
            if grad_scales is not None else (out, out)
        logits = self.head(to_head)
        if prev is not None:
            logits = logits + self.transfer(prev)
        return to_next, logits


class ExitLogits(nn.Module):
    """The head of a :class:`TransferStage`: the logits it put in the state."""

    def forward(self, state: tuple) -> Tensor:
        return state[1]


class _Pick(nn.Module):
    """Apply ``head`` to one named value of a dict state."""

    def __init__(self, key: str, head: nn.Module):
        super().__init__()
        self.key, self.head = key, head

    def forward(self, state: dict) -> Tensor:
        return self.head(state[self.key])


class MultiExitNetwork(nn.Module):
    """Stages and exit heads run in turn; see the module docstring.

    Subclasses (MSDNet, RANet) fill ``stages`` and ``heads`` and may override ``initial_state(x)``.
    """

    def __init__(self, stages: Sequence[nn.Module], heads: Sequence[nn.Module], num_classes: int,
                 in_chans: int = 3):
        super().__init__()
        if len(stages) != len(heads) or not stages:
            raise ValueError(f"need one head per stage, got {len(stages)} stages and {len(heads)} heads")
        self.stages, self.heads = nn.ModuleList(stages), nn.ModuleList(heads)
        self.num_classes, self.in_chans = num_classes, in_chans
        self.executor = Executor()
        # Gradient equilibrium (Li, Huang et al., ICCV 2019): in training, the gradient that flows back into the
        # shared trunk at exit k (of K) is rescaled, 1/(K-k) from exit k's own head and (K-k-1)/(K-k) from the
        # later exits, so that the trunk's gradient does not grow with the number of exits behind it. A training
        # recipe, not part of the architecture: inference and checkpoints do not depend on it.
        self.gradient_equilibrium = False
        # Stage-wise training (train/recipes/stagewise.py): each stage for its own exit, the earlier ones frozen. A
        # training recipe too; dyncnn train and the frontier read it.
        self.stagewise = False

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def initial_state(self, x: Tensor) -> State:
        return x

    def check_input(self, x: Tensor, check_finite: bool = True) -> Tensor:
        """The input checks of ``infer`` (and of ``forward`` in subclasses that check there): an image batch of
        the model's channels and dtype, and at least ``min_input_size`` on each side when the network has one (MSDNet:
        the coarsest scale must keep a pixel; exits on a backbone: the backbone's)."""
        check_image_batch(x, self.in_chans, check_finite=check_finite, dtype=param_dtype(self))
        need = getattr(self, "min_input_size", 1)
        if min(x.shape[-2:]) < need:
            raise DyncnnError(f"{type(self).__name__}: expected inputs of at least {need}x{need}, got "
                              f"{tuple(x.shape[-2:])}")
        # networks whose stages line up feature maps of different resolutions (``input_multiple``, and
        # ``input_multiple_why``: what makes it needed) take only sides that divide down exactly
        multiple = getattr(self, "input_multiple", 1)
        if x.shape[-1] % multiple or x.shape[-2] % multiple:
            raise DyncnnError(f"{type(self).__name__} {getattr(self, 'input_multiple_why', '')}: expected a height "
                              f"and width that are multiples of {multiple}, got {tuple(x.shape[-2:])}")
        return x

    @property
    def forward_transfer(self) -> bool:
        """Whether each exit also reads the previous exit's logits (:meth:`use_forward_transfer`)."""
        return bool(self.stages) and isinstance(self.stages[0], TransferStage)

    def use_forward_transfer(self, hidden: int = 128) -> "MultiExitNetwork":
        """Forward knowledge transfer (IMTA): every exit after the first also reads the previous exit's logits
        (:class:`ForwardTransfer`, ``hidden`` units). Each stage becomes a :class:`TransferStage` holding the stage
        and its exit head, and each head an :class:`ExitLogits`, so that inference, the ledger, ``exit_macs`` and
        bundle export run unchanged. An architecture change (the checkpoint's keys change): call it on a new
        network, before training. Returns the network."""
        if self.forward_transfer:
            raise ValueError(f"{type(self).__name__} already uses forward knowledge transfer")
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
            raise ValueError(f"forward transfer hidden units must be an integer >= 1, got {hidden!r}")
        stages = [TransferStage(stage, head, ForwardTransfer(self.num_classes, hidden) if k else None)
                  for k, (stage, head) in enumerate(zip(self.stages, self.heads))]
        device, dtype = module_device(self), param_dtype(self)
        self.stages = nn.ModuleList(stages).to(device=device, dtype=dtype)
        self.heads = nn.ModuleList(ExitLogits() for _ in stages)
        self.executor = Executor()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        state, outs = self.initial_state(x), []
        ge = self.gradient_equilibrium and self.training and torch.is_grad_enabled()
        k_exits = self.num_exits
        for k, (stage, head) in enumerate(zip(self.stages, self.heads)):
            scales = (1.0 / (k_exits - k), (k_exits - k - 1) / (k_exits - k)) if ge and k < k_exits - 1 else None
            if isinstance(stage, TransferStage):     # the head runs inside the stage: so does the rescaling
                state = stage(state, scales)
                outs.append(head(state))
            elif scales is not None:
                state = stage(state)
                outs.append(head(scale_grad(state, scales[0])))
                state = scale_grad(state, scales[1])
            else:
                state = stage(state)
                outs.append(head(state))
        return outs

    @torch.no_grad()
    def infer(self, x: Tensor, policy: ExitPolicy | Sequence[float] | None = None) -> ExitResult:
        """Real early-exit inference: exited samples leave the batch; returns logits, exit index and MACs per
        sample. ``policy`` is an ExitPolicy or a list of max-probability thresholds; None runs to the end.

        Inference is meant for a model in eval mode (``model.eval()``), which ``infer`` reads and never changes,
        so that several threads may share the model. A model left in training mode is not switched back and
        forth (another thread's call would then run BatchNorm in training mode and corrupt its statistics):
        the call runs on an eval-mode copy instead, which is correct but slower (it copies the weights)."""
        if isinstance(x, Tensor) and x.dim() == 4 and x.shape[0] == 0:   # an empty batch: the other checks
            self.check_input(x.new_zeros(()).expand(1, *x.shape[1:]), check_finite=False)
        else:
            self.check_input(x)
        policy = as_policy(policy, self.num_exits)
        if self.training:
            return eval_copy(self).infer(x, policy)
        if x.shape[0] == 0:
            return ExitResult(x.new_zeros(0, self.num_classes), torch.zeros(0, dtype=torch.int64),
                              torch.zeros(0, dtype=torch.int64))
        return early_exit_inference(list(self.stages), list(self.heads), self.initial_state(x), policy,
                                    self.executor, self.num_classes)

    @torch.no_grad()
    def exit_macs(self, x: Tensor) -> list[int]:
        """Cumulative MACs per sample of leaving at each exit: every stage and every head up to and including
        that exit's (the earlier heads ran to decide not to exit), measured with FlopCounterMode. This is also
        how the official MSDNet code counts."""
        was_training = self.training
        self.eval()
        try:
            state, total, out = self.initial_state(x[:1]), 0, []
            for stage, head in zip(self.stages, self.heads):
                total += measure_macs(stage, state)
                state = stage(state)
                total += measure_macs(head, state)     # earlier heads ran too: they decided not to exit
                out.append(total)
            return out
        finally:
            self.train(was_training)

    def full_macs(self, x: Tensor) -> int:
        """Per-sample MACs of running to the last exit (every stage and every head): the most a sample can cost."""
        return self.exit_macs(x[:1])[-1]


class SplitMultiExit(MultiExitNetwork):
    """A backbone cut into segments (dict states) with a head on each cut."""

    def __init__(self, stages, heads, num_classes, in_chans, input_name: str):
        super().__init__(stages, heads, num_classes, in_chans)
        self.input_name = input_name

    def initial_state(self, x: Tensor) -> dict:
        return {self.input_name: x}


def attach_exits(backbone: nn.Module, stages: Sequence[str] | None = None, head: str | Callable = "linear",
                 num_classes: int | None = None, example_size: int = 64) -> SplitMultiExit:
    """Attach exits to ``backbone`` after each module path in ``stages``.

    ``stages`` defaults to :func:`~dyncnn.dynamic.backbone.stage_ends`: every stage in ``backbone.stage_info``
    for dyncnn backbones; for torchvision/timm models the ends of the stages at output strides 8, 16 and 32
    (timm's ``feature_info`` where it has one; e.g. ``["features.6", "features.13", "features.18"]`` for
    torchvision's MobileNetV2, ``["layer2", "layer3", "layer4"]`` for a ResNet). Or give module paths
    (``["layer1", "layer2", "layer3"]``, ``["blocks.3", "blocks.7"]`` for a timm ViT).
    The model's own output is always the last exit: every named cut gets an exit head, and the rest of the
    network after the last cut, classifier included, is one more exit; when only the head (pooling,
    normalization, classifier) follows the last cut, the model's output is that cut's exit (so ``["layer1",
    "layer2", "layer3"]`` gives 4 exits, ``["features.6", "features.13", "features.18"]`` 3).
    ``head`` is ``"linear"`` (pool + linear; on transformer tokens, norm + token mean + linear),
    ``"conv"``/``"msdnet"`` (MSDNet's head) or a callable ``(channels, num_classes) -> nn.Module``.
    ``example_size`` is the input side of the one pass that finds each cut's channels.
    """
    in_chans = input_channels(backbone, default=3)
    if stages is None:
        stages = stage_ends(backbone, example_size)
    stages = list(stages)
    if isinstance(head, str) and head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {sorted(HEADS)} or a callable")
    # Split the whole forward: the last segment ends with the model's own classifier, the last exit.
    segments = split_model(backbone, stages, "forward")
    num_classes = num_classes or getattr(backbone, "num_classes", None)
    # channels at each cut, from a dummy pass
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            state = {segments[0].input_name: torch.zeros(1, in_chans, example_size, example_size)}
            shapes = []
            for seg in segments:
                state = seg(state)
                shapes.append(state[seg.boundary].shape)
    except Exception as e:  # noqa: BLE001 - whatever the backbone raises on an input size it does not take
        raise ValueError(f"attach_exits runs {type(backbone).__name__} once on a {in_chans}x{example_size}x"
                         f"{example_size} input to find the features at each cut, and it failed ({e}); pass "
                         f"example_size that the model accepts") from e
    finally:
        backbone.train(was_training)
    if num_classes is None:
        num_classes = shapes[-1][1]
    names = stages + ["(rest of the network)"]
    heads: list[nn.Module] = [_Pick(seg.boundary, _exit_head(head, shapes[k], num_classes, names[k]))
                              for k, seg in enumerate(segments[:-1])]
    heads.append(_Pick(segments[-1].boundary, nn.Identity()))
    net = SplitMultiExit(segments, heads, num_classes, in_chans, segments[0].input_name)
    net.exit_stages = stages
    net.min_input_size = getattr(backbone, "min_input_size", 1)
    # The backbone the segments were cut from (its modules are the segments' own, not copies), kept outside the
    # module tree so that the state dict is unchanged: its state dict files load into it (``weights=``, ``--init``)
    # and fine-tuning finds its classifier through it.
    object.__setattr__(net, "source_backbone", backbone)
    return net


class Cascade(MultiExitNetwork):
    """Independent models of increasing size; model k runs only on the samples that models < k were not
    confident about. Each stage passes the input through unchanged; the heads are the models."""

    def __init__(self, models: Sequence[nn.Module], num_classes: int, in_chans: int = 3):
        super().__init__([nn.Identity() for _ in models], list(models), num_classes, in_chans)
