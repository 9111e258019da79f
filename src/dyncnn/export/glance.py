"""GFNet as staged ONNX graphs plus a host-side driver that applies the exits (the graphs crop the patches).

A glance-and-focus network cannot be one static graph: which patch a focus step reads depends on the previous
step, and samples leave after different steps. The bundle therefore holds three graphs (batch axis dynamic):

- ``glance.onnx``: ``image``, ``h_in`` (zeros) -> ``logits``, ``h`` (classifier state), ``feat``, ``where`` (locator output);
- ``focus.onnx``: ``image``, ``h_in``, ``hp_in``, ``feat_in``, ``where_in`` -> ``logits``, ``h``, ``hp``, ``feat``,
  ``where`` (steps 2 .. T-1): the policy picks the centre, the patch is cropped in the graph (a GatherElements
  of flat pixel indices at the same integer corners as ``dynamic.patches.crop_patches``), encoded, classified;
- ``focus_last.onnx``: the same inputs -> ``logits`` (step T: no next patch to choose, no locator).

The GRUs export as single ONNX ``GRU`` ops and a power-of-two glance is average pooling (no Resize), so each graph
is little more than its backbone, and a step is one runtime call. The driver (:class:`GlanceBundle`) runs the
glance on the batch, then after each step keeps the rows whose confidence is below the step's threshold and runs
the next focus graph on them only (the policy therefore runs only for samples that go on). Every sample is
charged the eager per-step MACs (measured with FlopCounterMode at export) of the
steps it ran, so its ledger equals eager ``GFNet.infer``'s. The confidence rule is the multi-exit runtime's
(:func:`dyncnn.export.runtime.confidence_np`), which reproduces eager decisions. The manifest shares the
``dyncnn-bundle-1`` format of :mod:`dyncnn.export.staged`, with ``kind = "glance"``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..dynamic.policy import ExitPolicy
from ..models.gfnet import GFNet, gather_patches, traceable_corners
from .onnx import ExportError, export_graph, onnx_session, relative_error
from .bundle_format import (FORMAT, MANIFEST, BundleError, base_manifest, bundle_file, check_graph_shapes,
                            file_record, read_manifest, register_writer, write_manifest, writing_bundle)
from .host import _as_batch, confidence_np, one_sample_leaves

KIND = "glance"


class _Glance(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor, h: Tensor):
        s = self.model.glance_step(image, h)      # h: zeros from the driver (no shape arithmetic in the graph)
        return s["logits"], s["h"], s["feat"], s["where"]


class _Focus(nn.Module):
    """A whole focus step in one graph: policy -> corners -> in-graph crop -> local encoder -> classifier (and
    the locator, but in the last step)."""

    def __init__(self, model, side: int, last: bool):
        super().__init__()
        self.model, self.side, self.last = model, side, last

    def forward(self, image: Tensor, h: Tensor, hp: Tensor, feat: Tensor, where: Tensor):
        m, p = self.model, self.model.cfg.patch_size
        center, hp = m.policy(feat, where, hp)
        corners = traceable_corners(center, self.side, p)
        patch = gather_patches(image, corners, p)
        s = m.focus_step(patch, h, None if self.last else corners.to(image.dtype) / self.side, self.side)
        if self.last:
            return s["logits"]
        return s["logits"], s["h"], hp, s["feat"], s["where"]


@register_writer(GFNet)
def export_glance_bundle(model: GFNet, out_dir: str | os.PathLike, *, input_size: int | None = None,
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
    with writing_bundle(out_dir, model) as tmp:
        gen = torch.Generator().manual_seed(seed)
        image = torch.rand(2, model.in_chans, side, side, generator=gen)
        p, hid, pol = model.cfg.patch_size, model.cfg.hidden_dim, model.cfg.policy_dim
        h, hp = torch.randn(2, hid, generator=gen), torch.randn(2, pol, generator=gen)
        feat, where = torch.randn(2, model.cfg.feature_dim, generator=gen), torch.rand(2, 2, generator=gen)
        what = type(model).__name__
        export_graph(_Glance(model), (image, h), tmp / "glance.onnx", ["image", "h_in"],
                     ["logits", "h", "feat", "where"],
                     opset=opset, what=f"{what} glance step", strip="model.")
        names = ["image", "h_in", "hp_in", "feat_in", "where_in"]
        export_graph(_Focus(model, side, False), (image, h, hp, feat, where), tmp / "focus.onnx", names,
                     ["logits", "h", "hp", "feat", "where"], opset=opset, what=f"{what} focus step", strip="model.")
        export_graph(_Focus(model, side, True), (image, h, hp, feat, where), tmp / "focus_last.onnx", names,
                     ["logits"], opset=opset, what=f"{what} last focus step", strip="model.")
        steps = model.step_macs(image[:1])
        manifest = base_manifest(model, KIND, (model.in_chans, side, side), opset)
        manifest.update(num_classes=model.num_classes, num_exits=model.num_steps, patch_size=p, step_macs=steps,
                        policy_dim=pol, hidden_dim=hid,
                        exit_macs=np.cumsum(steps).tolist(), policy=policy.to_dict(),
                        graphs={name: {"files": {"fp32": file_record(tmp, f"{name}.onnx")}}
                                for name in ("glance", "focus", "focus_last")})
        write_manifest(tmp, manifest)
        checks = [torch.rand(3, model.in_chans, side, side, generator=gen), *check_inputs]
        manifest["check"] = {"max_rel_err": check_glance_bundle(model, tmp, checks, policy), "batches": len(checks)}
        write_manifest(tmp, manifest)
    return manifest


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
    manifest = read_manifest(folder)
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
        self.policy_dim, self.hidden_dim = int(manifest["policy_dim"]), int(manifest["hidden_dim"])
        self._rules: tuple | None = None       # (policy, per-step (threshold, temperature)) of the last policy
        self.sessions = {}
        for name, entry in manifest["graphs"].items():
            f = bundle_file(folder, entry["files"]["fp32"], f"graph {name!r}", verify)
            self.sessions[name] = onnx_session(f, threads)
            check_graph_shapes(folder, self.sessions[name], f"graph {name!r}", {"image": self.input_shape},
                               self.num_classes)

    def _policy(self, policy) -> ExitPolicy:
        if policy is None:
            return self.policy
        policy = ExitPolicy.of(policy)
        if len(policy.thresholds) not in (self.num_exits - 1, self.num_exits):
            raise BundleError(f"expected {self.num_exits - 1} thresholds, got {len(policy.thresholds)}")
        return policy

    def _step(self, k: int, x: np.ndarray, st: dict) -> dict:
        """Step ``k`` on the rows in ``x`` / ``st`` (h, hp, feat, where): one graph call per step."""
        if k == 0:
            n = x.shape[0]
            logits, h, feat, where = self.sessions["glance"].run(
                None, {"image": x, "h_in": np.zeros((n, self.hidden_dim), dtype=np.float32)})
            return {"logits": logits, "h": h, "feat": feat, "where": where,
                    "hp": np.zeros((n, self.policy_dim), dtype=np.float32)}
        feeds = {"image": x, "h_in": st["h"], "hp_in": st["hp"], "feat_in": st["feat"], "where_in": st["where"]}
        if k == self.num_exits - 1:
            return {"logits": self.sessions["focus_last"].run(None, feeds)[0]}
        logits, h, hp, feat, where = self.sessions["focus"].run(None, feeds)
        return {"logits": logits, "h": h, "hp": hp, "feat": feat, "where": where}

    def step_logits(self, x: Any) -> list[np.ndarray]:
        """Every step's logits for every sample (no exits), as eager ``model(x)`` in eval mode."""
        x = _as_batch(x, self.input_shape)
        st, outs = {}, []
        for k in range(self.num_exits):
            st = self._step(k, x, st)
            outs.append(st["logits"])
        return outs

    def _check(self, x: Any) -> np.ndarray:
        """The input checks of ``export.runtime._as_batch``, with a quick accept for what a batch-1 caller
        passes (a C-contiguous float32 array of the exported shape with a finite sum): the driver's own overhead
        is what a wall-clock comparison against a single static graph measures."""
        if (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 4 and x.shape[1:] == self.input_shape
                and x.flags.c_contiguous and math.isfinite(float(x.sum()))):
            return x
        return _as_batch(x, self.input_shape)

    def _exit_rules(self, policy: ExitPolicy) -> list:
        """Per step but the last, (threshold as float32, temperature); cached for the last policy seen."""
        if self._rules is None or self._rules[0] is not policy:
            last = self.num_exits - 1
            rules = [(np.float32(policy.thresholds[k]) if k < len(policy.thresholds) else np.float32(-np.inf),
                      policy.temperature(k)) for k in range(last)]
            self._rules = (policy, rules)
        return self._rules[1]

    def _run_one(self, x: np.ndarray, policy: ExitPolicy) -> tuple[np.ndarray, int]:
        """One image: the same decisions as the batched loop without its row bookkeeping."""
        rules, st = self._exit_rules(policy), {}
        for k in range(self.num_exits):
            st = self._step(k, x, st)
            last = k == self.num_exits - 1
            thr, temp = (None, 1.0) if last else rules[k]
            if one_sample_leaves(k, st["logits"], last, thr, policy.criterion, temp, "step"):
                return st["logits"], k
        raise AssertionError  # unreachable: the last step returns

    def run_numpy(self, x: Any, policy=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(logits (N, C), exit step (N,), MACs (N,))``: exited rows leave, the rest get their next patch."""
        policy = self._policy(policy)
        x = self._check(x)
        n, last = x.shape[0], self.num_exits - 1
        if n == 1:
            logits, k = self._run_one(x, policy)
            return logits, np.array([k], dtype=np.int64), self.exit_macs[k:k + 1]
        logits_out = np.zeros((n, self.num_classes), dtype=np.float32)
        exit_index = np.full(n, last, dtype=np.int64)
        rows, st = np.arange(n), {}
        for k in range(self.num_exits):
            st = self._step(k, x, st)
            logits = st["logits"]
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
                x, rows = x[keep], rows[keep]
                st = {key: v[keep] for key, v in st.items()}
        return logits_out, exit_index, self.exit_macs[exit_index]

    def run(self, x: Any, policy=None):
        from ..dynamic.executor import ExitResult
        logits, exit_index, macs = self.run_numpy(x, policy)
        return ExitResult(torch.from_numpy(logits), torch.from_numpy(exit_index), torch.from_numpy(macs))
