"""GFNet as staged ONNX graphs plus a host-side driver that crops patches and applies the exits.

A glance-and-focus network cannot be one static graph: which patch a focus step reads depends on the previous
step, and samples leave after different steps. The bundle therefore holds three graphs (batch axis dynamic):

- ``glance.onnx``: ``image`` -> ``logits``, ``h`` (classifier state), ``hp`` (policy state), ``center``;
- ``focus.onnx``: ``patch``, ``h_in``, ``hp_in`` -> ``logits``, ``h``, ``hp``, ``center`` (steps 2 .. T-1);
- ``focus_last.onnx``: ``patch``, ``h_in`` -> ``logits`` (step T: no next patch to choose).

The driver (:class:`GlanceBundle`) runs the glance on the batch, then after each step keeps the rows whose
confidence is below the step's threshold, crops their next patches with numpy (the same integer corners as
``dynamic.patches.crop_patches``: ``round(center * (side - patch))``, half to even) and runs the next focus graph
on them only. Every sample is charged the eager per-step MACs (measured with FlopCounterMode at export) of the
steps it ran, so its ledger equals eager ``GFNet.infer``'s. The confidence rule is the multi-exit runtime's
(:func:`dyncnn.export.runtime.confidence_np`), which reproduces eager decisions. The manifest shares the
``dyncnn-bundle-1`` format of :mod:`dyncnn.export.staged`, with ``kind = "glance"``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..dynamic.policy import ExitPolicy
from .onnx import ExportError, export_graph, onnx_session, relative_error
from .runtime import BundleError, _as_batch, confidence_np
from .staged import FORMAT, MANIFEST, _base_manifest, _commit, _prepare_out_dir, file_record, sha256_file, \
    write_manifest

KIND = "glance"


class _Glance(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor):
        s = self.model._run_step(0, self.model.initial_state(image))
        return s["logits"], s["h"], s["hp"], s["center"]


class _Focus(nn.Module):
    def __init__(self, model, last: bool):
        super().__init__()
        self.model, self.last = model, last

    def forward(self, patch: Tensor, h: Tensor, hp: Tensor | None = None):
        m = self.model
        feat = m.focus_features(patch)
        logits, h = m.classify(feat, h)
        if self.last:
            return logits
        center, hp = m.policy(feat, hp)
        return logits, h, hp, center


def crop_patches_np(images: np.ndarray, centers: np.ndarray, size: int) -> np.ndarray:
    """numpy twin of :func:`dyncnn.dynamic.patches.crop_patches` (same corners: ``round(center * (side - size))``,
    half to even, in float32): one ``np.take`` of flat pixel indices for the whole batch; a plain slice at batch 1,
    where numpy's per-call overheads would cost more than the copy."""
    n, c, h, w = images.shape
    scale = np.array([h - size, w - size], dtype=np.float32)
    corners = np.rint(np.minimum(np.maximum(centers.astype(np.float32, copy=False), 0), 1) * scale).astype(np.int64)
    if n == 1:
        top, left = int(corners[0, 0]), int(corners[0, 1])
        return np.ascontiguousarray(images[:, :, top:top + size, left:left + size])
    offs = np.arange(size, dtype=np.int64)
    grid = (offs[:, None] * w + offs[None, :]).ravel()                               # (P*P,)
    start = corners[:, 0] * w + corners[:, 1]
    base = (np.arange(n, dtype=np.int64)[:, None] * c + np.arange(c)[None, :]) * (h * w) + start[:, None]
    return np.take(images.reshape(-1), base[:, :, None] + grid).reshape(n, c, size, size)


def export_glance_bundle(model, out_dir: str | os.PathLike, *, input_size: int | None = None,
                         policy: ExitPolicy | Sequence[float] | None = None, check_inputs: Sequence[Tensor] = (),
                         opset: int = 17, seed: int = 0) -> dict:
    """Export a GFNet to ``out_dir`` (three graphs + manifest) for ``input_size`` square images (default: the
    model's); ``policy`` (default: every step) is recorded. Checked against eager: every step's logits on a random
    batch and on ``check_inputs`` (relative error below 1e-4), and the driver's exits equal eager ``infer``'s."""
    out_dir = Path(out_dir)
    side = int(input_size or model.cfg.input_size)
    if side < model.cfg.patch_size:
        raise ExportError(f"input size {side} is smaller than the patch size {model.cfg.patch_size}")
    policy = model._coerce_policy(policy)
    was_training = model.training
    model.eval()
    tmp = _prepare_out_dir(out_dir)
    try:
        gen = torch.Generator().manual_seed(seed)
        image = torch.rand(2, model.in_chans, side, side, generator=gen)
        p, hid, pol = model.cfg.patch_size, model.cfg.hidden_dim, model.cfg.policy_dim
        patch = torch.rand(2, model.in_chans, p, p, generator=gen)
        h, hp = torch.randn(2, hid, generator=gen), torch.randn(2, pol, generator=gen)
        what = type(model).__name__
        export_graph(_Glance(model), (image,), tmp / "glance.onnx", ["image"], ["logits", "h", "hp", "center"],
                     opset=opset, what=f"{what} glance step", strip="model.")
        export_graph(_Focus(model, False), (patch, h, hp), tmp / "focus.onnx", ["patch", "h_in", "hp_in"],
                     ["logits", "h", "hp", "center"], opset=opset, what=f"{what} focus step", strip="model.")
        export_graph(_Focus(model, True), (patch, h), tmp / "focus_last.onnx", ["patch", "h_in"], ["logits"],
                     opset=opset, what=f"{what} last focus step", strip="model.")
        steps = model.step_macs(image[:1])
        manifest = _base_manifest(model, KIND, (model.in_chans, side, side), opset)
        manifest.update(num_classes=model.num_classes, num_exits=model.num_steps, patch_size=p, step_macs=steps,
                        exit_macs=np.cumsum(steps).tolist(), policy=policy.to_dict(),
                        graphs={name: {"files": {"fp32": file_record(tmp, f"{name}.onnx")}}
                                for name in ("glance", "focus", "focus_last")})
        write_manifest(tmp, manifest)
        checks = [torch.rand(3, model.in_chans, side, side, generator=gen), *check_inputs]
        manifest["check"] = {"max_rel_err": check_glance_bundle(model, tmp, checks, policy), "batches": len(checks)}
        write_manifest(tmp, manifest)
        _commit(tmp, out_dir)
        return manifest
    finally:
        model.train(was_training)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_glance_bundle(model, folder, inputs: Sequence[Tensor], policy: ExitPolicy | None = None,
                        tol: float = 1e-4) -> float:
    """Worst relative error of every step's logits against eager; the driver's exit steps and MACs must equal
    eager ``infer``'s under ``policy``. Raises ExportError otherwise."""
    bundle = load_glance_bundle(folder)
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            for got, want in zip(bundle.step_logits(x), model(x)):
                worst = max(worst, relative_error(got, want))
            if policy is not None:
                eager, got = model.infer(x, policy), bundle.run(x, policy)
                if not torch.equal(eager.exit_index, got.exit_index) or not torch.equal(eager.macs, got.macs):
                    raise ExportError(f"glance bundle {folder}: the driver's exit steps {got.exit_index.tolist()} "
                                      f"differ from eager's {eager.exit_index.tolist()}")
    if worst >= tol:
        raise ExportError(f"glance bundle {folder} disagrees with eager: relative error {worst:.2e} >= {tol:.0e}")
    return worst


def load_glance_bundle(folder: str | os.PathLike, threads: int = 1, verify: bool = True) -> "GlanceBundle":
    """Load a GFNet bundle written by :func:`export_glance_bundle` (checks format, kind and file checksums)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        raise BundleError(f"{folder} holds no {MANIFEST}: not a dyncnn bundle (write one with export_glance_bundle)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("kind") != KIND:
        raise BundleError(f"{path}: expected a {FORMAT!r} bundle of kind {KIND!r}, got {manifest.get('format')!r} "
                          f"/ {manifest.get('kind')!r}")
    return GlanceBundle(folder, manifest, threads, verify)


class GlanceBundle:
    """The host-side driver: ``run(x, policy)`` is eager ``GFNet.infer`` with ONNX Runtime and numpy crops."""

    def __init__(self, folder: Path, manifest: dict, threads: int = 1, verify: bool = True):
        self.folder, self.manifest = folder, manifest
        self.input_shape = tuple(manifest["input"]["shape"][1:])
        self.num_exits, self.patch = int(manifest["num_exits"]), int(manifest["patch_size"])
        self.num_classes = int(manifest["num_classes"])
        self.exit_macs = np.asarray(manifest["exit_macs"], dtype=np.int64)
        self.policy = ExitPolicy(**manifest["policy"])
        self.sessions = {}
        for name, entry in manifest["graphs"].items():
            rec = entry["files"]["fp32"]
            f = folder / rec["file"]
            if not f.exists():
                raise BundleError(f"bundle {folder}: graph file {rec['file']} is missing")
            if verify and sha256_file(f) != rec["sha256"]:
                raise BundleError(f"bundle {folder}: {rec['file']} does not match the manifest's checksum")
            self.sessions[name] = onnx_session(f, threads)

    def _policy(self, policy) -> ExitPolicy:
        if policy is None:
            return self.policy
        policy = policy if isinstance(policy, ExitPolicy) else ExitPolicy(list(policy))
        if len(policy.thresholds) not in (self.num_exits - 1, self.num_exits):
            raise BundleError(f"expected {self.num_exits - 1} thresholds, got {len(policy.thresholds)}")
        return policy

    def _step(self, k: int, x: np.ndarray, h, hp, center):
        if k == 0:
            return self.sessions["glance"].run(None, {"image": x})
        patch = crop_patches_np(x, center, self.patch)
        if k == self.num_exits - 1:
            return self.sessions["focus_last"].run(None, {"patch": patch, "h_in": h})[0], None, None, None
        return self.sessions["focus"].run(None, {"patch": patch, "h_in": h, "hp_in": hp})

    def step_logits(self, x: Any) -> list[np.ndarray]:
        """Every step's logits for every sample (no exits), as eager ``model(x)`` in eval mode."""
        x = _as_batch(x, self.input_shape)
        h = hp = c = None
        outs = []
        for k in range(self.num_exits):
            logits, h, hp, c = self._step(k, x, h, hp, c)
            outs.append(logits)
        return outs

    def run_numpy(self, x: Any, policy=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(logits (N, C), exit step (N,), MACs (N,))``: exited rows leave, the rest get their next patch."""
        policy = self._policy(policy)
        x = _as_batch(x, self.input_shape)
        n, last = x.shape[0], self.num_exits - 1
        logits_out = np.zeros((n, self.num_classes), dtype=np.float32)
        exit_index = np.full(n, last, dtype=np.int64)
        rows, h, hp, c = np.arange(n), None, None, None
        for k in range(self.num_exits):
            logits, h, hp, c = self._step(k, x, h, hp, c)
            if not np.isfinite(logits).all():
                raise FloatingPointError(f"step {k} produced NaN/Inf logits; refusing to take an exit decision")
            thr = np.float32(policy.thresholds[k]) if k < min(last, len(policy.thresholds)) else np.float32(-np.inf)
            if thr == np.inf:
                continue
            done = (np.ones(len(rows), dtype=bool) if thr == -np.inf else
                    confidence_np(logits, policy.criterion, policy.temperature(k)) >= thr)
            logits_out[rows[done]] = logits[done]
            exit_index[rows[done]] = k
            if done.all():
                break
            if done.any():
                keep = ~done
                x, h, hp, c, rows = x[keep], h[keep], hp[keep], c[keep], rows[keep]
        return logits_out, exit_index, self.exit_macs[exit_index]

    def run(self, x: Any, policy=None):
        from ..dynamic.executor import ExitResult
        logits, exit_index, macs = self.run_numpy(x, policy)
        return ExitResult(torch.from_numpy(logits), torch.from_numpy(exit_index), torch.from_numpy(macs))
