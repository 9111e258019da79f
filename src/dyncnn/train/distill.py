"""Knowledge distillation from a trained teacher, as a loss for :class:`~dyncnn.train.trainer.Trainer`.

A cascade matches its last member's accuracy when the cheap members' answers agree with that member's on the
images they let leave: :class:`Distillation` trains a network on ``(1 - weight) * CE(labels) + weight *``
:func:`~dyncnn.dynamic.width.distillation_loss` (Hinton's soft targets at ``temperature``) from the teacher's
logits of the same training batch. The teacher runs in eval mode without gradients, inside the student's training
forwards (a forward hook, so the trainer, its checkpoints and the student's state dict are unchanged); in
evaluation forwards it does not run and the loss is the cross-entropy alone.

    with Distillation(student, teacher, weight=0.5, temperature=4.0) as kd:
        Trainer(student, train, val, cfg, loss_fn=kd.loss).fit()
"""
from __future__ import annotations

import copy
import hashlib

import torch
from torch import Tensor, nn

from ..dynamic.width import distillation_loss
from .trainer import default_loss, final_logits


class Distillation:
    """The distillation loss of ``student`` from ``teacher`` while the context is open (see the module docstring).

    The teacher is copied (its copy follows the inputs' device and memory format); ``label_smoothing`` applies to
    the cross-entropy term, as the trainer's default loss applies it.

    ``cache``: the teacher's logits are kept per image (keyed by a digest of its bytes) and an image seen before
    is not run through the teacher again. In eval mode the teacher is a function of the image, so this changes
    nothing but the time when the training set has no random augmentation (the frontier's stored renderings):
    10 epochs run the teacher once per image instead of 10 times. With random augmentation every image is new;
    leave it off there (the cache would only grow).
    ``teacher_images`` counts the images the teacher ran on."""

    def __init__(self, student: nn.Module, teacher: nn.Module, weight: float = 0.5, temperature: float = 4.0,
                 label_smoothing: float = 0.0, cache: bool = False):
        if not 0 < weight <= 1:
            raise ValueError(f"distillation weight must be in (0, 1], got {weight!r}")
        if not temperature > 0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature!r}")
        if teacher is student:
            raise ValueError("the teacher must be another network than the student")
        self.student, self.weight, self.temperature = student, float(weight), float(temperature)
        self.label_smoothing = float(label_smoothing)
        self._ce = default_loss(self.label_smoothing)     # the trainer's own cross-entropy
        self._source, self._teacher, self._handle, self._logits = teacher, None, None, None
        self.cache: dict[bytes, Tensor] | None = {} if cache else None
        self.teacher_images = 0

    def __enter__(self) -> "Distillation":
        self._teacher = copy.deepcopy(self._source).eval().requires_grad_(False)
        self._placed = None
        self._handle = self.student.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._teacher = self._handle = self._logits = None

    def _hook(self, module: nn.Module, args: tuple, output) -> None:
        if not module.training:
            return
        x = args[0]
        fmt = torch.channels_last if x.ndim == 4 and not x.is_contiguous() and \
            x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        if (x.device, fmt) != self._placed:         # the teacher follows the inputs (once per change)
            self._teacher.to(x.device, memory_format=fmt)
            self._placed = (x.device, fmt)
        with torch.no_grad():
            self._logits = self._teacher_logits(x.detach())

    def _teacher_logits(self, x: Tensor) -> Tensor:
        if self.cache is None:
            self.teacher_images += len(x)
            return final_logits(self._teacher(x)).float()
        keys = [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in x.cpu().contiguous()]
        miss = [i for i, k in enumerate(keys) if k not in self.cache]
        if miss:
            new = final_logits(self._teacher(x[miss])).float().cpu()
            self.cache.update(zip((keys[i] for i in miss), new))
            self.teacher_images += len(miss)
        return torch.stack([self.cache[k] for k in keys]).to(x.device)

    def loss(self, outputs, target: Tensor) -> Tensor:
        """The training loss (a training forward of the student ran just before), or the cross-entropy alone in
        evaluation."""
        out = final_logits(outputs)
        ce = self._ce(outputs, target)
        if not self.student.training:
            return ce
        if self._handle is None:
            raise RuntimeError("Distillation.loss in training outside its context (use `with Distillation(...)`)")
        t, self._logits = self._logits, None
        if t is None or t.shape != out.shape:
            raise RuntimeError("no teacher logits for this batch: the loss must follow a training forward of the "
                               "student it was made for")
        return (1 - self.weight) * ce + self.weight * distillation_loss(out, t, self.temperature)
