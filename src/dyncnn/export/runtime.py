"""The host-side driver of an exported bundle: ONNX Runtime sessions plus the exit policy, in numpy.

``load_bundle(dir)`` checks the bundle before it loads anything (manifest present, of this format, every graph file
present with the recorded SHA-256, each session's inputs and outputs as the manifest says) and returns a
:class:`StaticBundle` or a :class:`DynamicBundle`. ``DynamicBundle.run(x)`` is eager ``MultiExitNetwork.infer``
re-done on the host: stage ``k``'s session runs on the rows still active, head ``k`` scores them, the rows whose
confidence meets threshold ``k`` leave with those logits, and only the others are fed to stage ``k + 1`` (the
state's leaves are compacted, as the eager executor does). Each sample is charged the manifest's per-stage and
per-head MACs of every stage it ran (the cumulative cost of its exit), so the MAC ledger equals eager's.

The confidence is computed in float32 in the same order of operations as ``torch.softmax`` on CPU (subtract the
row maximum, exponentiate, multiply by the reciprocal of the sum) and compared with the threshold rounded to
float32, as eager does. Two float32 computations of an exponential can still differ in the last bit, and ONNX
Runtime's logits differ from eager's by about 1e-6, so a sample whose confidence lies within ~1e-6 of a threshold
could be decided differently; thresholds calibrated on the validation split are not that close to any test
sample in practice (the tests check equality of every decision on the whole ScaledMNIST test split).

A batch of one sample takes a shorter path (``_run_one``): no row bookkeeping, and the exit test of
:func:`exit_test_one`, which screens the max-probability confidence in double precision on the logits as Python
floats and asks the float32 twin only within ``SCREEN_MARGIN`` of the threshold, so it decides as the twin does
at about a tenth of its cost (the test runs after every stage, against stages of a tenth of a millisecond).

Inputs are checked before any session runs: a 4-D batch of the exported channels and size, floating point
(cast to float32), finite values.
"""
from __future__ import annotations

import json
import math
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Sequence

import numpy as np
import torch

from ..dynamic.policy import ExitPolicy
from ..errors import DyncnnError, InputTypeError
from .staged import FORMAT, MANIFEST, RUNTIMES, graph_io, sha256_file

PRECISIONS = ("fp32", "int8")


class BundleError(DyncnnError):
    """A bundle folder that is missing, of another format version, or whose files do not match its manifest."""


def confidence_np(logits: np.ndarray, criterion: str = "max_prob", temperature: float = 1.0) -> np.ndarray:
    """numpy twin of :func:`dyncnn.dynamic.policy.confidence` (float32, same order of operations)."""
    z = np.asarray(logits, dtype=np.float32)
    if temperature != 1.0:
        z = z / np.float32(temperature)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    inv = np.float32(1.0) / e.sum(axis=-1, keepdims=True)
    if criterion == "max_prob":       # the top probability is exp(0) * inv = inv exactly
        return inv[:, 0]
    p = e * inv
    if criterion == "margin":
        top = np.partition(p, p.shape[-1] - 2, axis=-1)[:, -2:]
        return top[:, 1] - top[:, 0]
    if criterion == "entropy":
        ent = -(p * np.log(np.maximum(p, np.float32(1e-12)))).sum(axis=-1, dtype=np.float32)
        return -ent / np.float32(math.log(p.shape[-1]))
    raise ValueError(f"unknown exit criterion {criterion!r}; expected max_prob, entropy or margin")


SCREEN_MARGIN = 1e-4    # float32's rounding moves a confidence by a few 1e-7: beyond this, it cannot flip a decision
_SCALAR_CLASSES = 64     # up to this many classes, one sample's logits are read as Python floats


def row_values(logits: np.ndarray) -> list[float] | None:
    """One sample's (1, C) logits as Python floats when ``C`` is small (the fast exit test), else None."""
    return logits.ravel().tolist() if logits.shape[-1] <= _SCALAR_CLASSES else None


def logits_finite(logits: np.ndarray, values: list[float] | None = None) -> bool:
    """No NaN/Inf in ``logits``; ``values``: the same as :func:`row_values` (their double sum cannot overflow)."""
    if values is not None:
        return math.isfinite(sum(values))
    return bool(np.isfinite(logits.sum()) or np.isfinite(logits).all())   # the float32 sum may overflow


def exit_test_one(logits: np.ndarray, values: list[float] | None, criterion: str, temperature: float,
                  threshold: np.float32) -> bool:
    """``confidence_np(logits, criterion, temperature)[0] >= threshold`` for one sample's finite (1, C) logits.

    The driver makes this test after every stage of a batch-1 call, where the float32 twin's seven numpy calls
    (about 14 us) would weigh on stages of 0.1-0.2 ms. For ``max_prob`` the confidence is first computed in double
    precision on ``values`` (:func:`row_values`, about 1.5 us); the float32 twin decides only when that confidence
    lies within :data:`SCREEN_MARGIN` of the threshold. So the decision is always the float32 twin's.
    """
    if criterion == "max_prob" and values is not None:
        m, t, s = max(values), float(temperature), 0.0
        for v in values:
            s += math.exp((v - m) / t)
        c, thr = 1.0 / s, float(threshold)
        if abs(c - thr) > SCREEN_MARGIN:
            return c > thr
    return bool(confidence_np(logits, criterion, temperature)[0] >= threshold)


def _non_finite(k: int, logits: np.ndarray, step: str = "exit") -> NoReturn:
    raise FloatingPointError(f"{step} {k} produced NaN/Inf logits for {int((~np.isfinite(logits)).any(1).sum())} "
                             f"samples; refusing to take an exit decision on them")


def one_sample_leaves(k: int, logits: np.ndarray, last: bool, threshold: np.float32 | None, criterion: str,
                      temperature: float, step: str = "exit") -> bool:
    """Whether the one sample of ``logits`` (1, C) leaves at ``step`` ``k``: NaN/Inf logits are refused, the last
    step always takes it, an infinite threshold never / always does (eager's decision without the math), and
    otherwise :func:`exit_test_one` decides. The batch-1 loop of the multi-exit and glance drivers."""
    values = row_values(logits)
    if not logits_finite(logits, values):
        _non_finite(k, logits, step)
    if last:
        return True
    if threshold == np.inf:
        return False
    return threshold == -np.inf or exit_test_one(logits, values, criterion, temperature, threshold)


def _read_manifest(folder: Path) -> dict:
    if not folder.is_dir():
        raise BundleError(f"bundle {folder} does not exist or is not a folder (write one with `dyncnn export`)")
    path = folder / MANIFEST
    if not path.exists():
        raise BundleError(f"bundle {folder} has no {MANIFEST}: not a dyncnn bundle, or an export that did not "
                          f"finish (write one with `dyncnn export`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path} is not valid JSON: {e}") from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != FORMAT:
        raise BundleError(f"{path} has format {fmt!r}; this dyncnn reads {FORMAT!r} (re-export the model with "
                          f"this version)")
    if manifest.get("kind") not in ("static", "multi_exit", "glance"):
        raise BundleError(f"{path}: unknown bundle kind {manifest.get('kind')!r}")
    validate_manifest(manifest, str(path))
    return manifest


# What each kind of bundle must hold (beyond format and kind), checked before anything is read.
_KIND_KEYS = {"static": ("graph",), "multi_exit": ("num_exits", "stages", "exit_macs", "policy"),
              "glance": ("num_exits", "graphs", "exit_macs", "policy", "patch_size", "policy_dim", "hidden_dim")}
MAX_GRAPH_BYTES = 1 << 32      # 4 GiB: ONNX protobufs cannot be larger without external data


def _positive_int(value, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BundleError(f"{where}: {what} must be a positive integer, got {value!r:.80}")
    return value


def validate_manifest(manifest: dict, where: str = "manifest") -> None:
    """The checks that a manifest (untrusted input, like any file) must pass before the driver uses it, with the
    rules of the Python API: the content its ``kind`` needs; the input shape and class count positive integers;
    per exit a stage and a non-negative, non-decreasing cumulative MAC count; an exit policy with one threshold
    per exit but the last (or one per exit), finite positive temperatures."""
    kind = manifest.get("kind")
    missing = [k for k in _KIND_KEYS[kind] if k not in manifest]
    if missing:
        other = [k for k, keys in _KIND_KEYS.items() if k != kind and all(key in manifest for key in keys)]
        hint = f"; its content is that of a {other[0]!r} bundle" if other else ""
        raise BundleError(f"{where}: a bundle of kind {kind!r} needs {', '.join(missing)}, which it lacks{hint}")
    shape = (manifest.get("input") or {}).get("shape") if isinstance(manifest.get("input"), dict) else None
    if not isinstance(shape, list) or len(shape) != 4:
        raise BundleError(f"{where}: input.shape must be ['batch', C, H, W], got {shape!r:.80}")
    for v, what in zip(shape[1:], ("input channels", "input height", "input width")):
        _positive_int(v, what, where)
    _positive_int(manifest.get("num_classes"), "num_classes", where)
    if kind == "static":
        if not isinstance(manifest["graph"], dict):
            raise BundleError(f"{where}: graph must be an object, got {type(manifest['graph']).__name__}")
        return
    k = _positive_int(manifest["num_exits"], "num_exits", where)
    listed = manifest["graphs"] if kind == "glance" else manifest["stages"]
    if kind == "multi_exit" and (not isinstance(listed, list) or len(listed) != k):
        raise BundleError(f"{where}: expected {k} stages (one per exit), got "
                          f"{len(listed) if isinstance(listed, list) else type(listed).__name__}")
    if kind == "glance" and not isinstance(listed, dict):
        raise BundleError(f"{where}: graphs must be an object, got {type(listed).__name__}")
    macs = manifest["exit_macs"]
    if not isinstance(macs, list) or len(macs) != k or \
            any(isinstance(m, bool) or not isinstance(m, int) or m < 0 for m in macs):
        raise BundleError(f"{where}: exit_macs must list {k} non-negative integers (cumulative MACs per exit), "
                          f"got {macs!r:.120}")
    if any(b < a for a, b in zip(macs, macs[1:])):
        raise BundleError(f"{where}: exit_macs must not decrease (they are cumulative), got {macs}")
    p = manifest["policy"]
    if not isinstance(p, dict):
        raise BundleError(f"{where}: policy must be an object, got {type(p).__name__}")
    try:
        policy = ExitPolicy(p.get("thresholds"), p.get("criterion", "max_prob"), p.get("temperatures", []))
    except DyncnnError as e:
        raise BundleError(f"{where}: invalid exit policy: {e}") from None
    if len(policy.thresholds) not in (k - 1, k):
        raise BundleError(f"{where}: the exit policy has {len(policy.thresholds)} thresholds; expected {k - 1} "
                          f"(one per exit but the last)")
    if len(policy.temperatures) not in (0, k - 1, k):
        raise BundleError(f"{where}: the exit policy has {len(policy.temperatures)} temperatures; expected none "
                          f"or one per exit ({k})")


def bundle_file(folder: Path, rec: object, what: str, verify: bool) -> Path:
    """The graph file that manifest record ``rec`` names, after the checks that keep a crafted manifest inside
    the bundle: a relative name without ``..`` (``stage0.onnx``, ``int8/stage0.onnx``), not absolute, of a
    regular file inside ``folder`` (not a device, FIFO or a link out of the folder), whose size is checked
    before it is hashed."""
    name = rec.get("file") if isinstance(rec, dict) else None
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or any(part in ("", ".", "..") for part in parts) or "\\" in name or "\0" in name or \
            os.path.isabs(name):
        raise BundleError(f"bundle {folder}: {what}: the manifest names the file {name!r:.80}; expected a plain "
                          f"file name inside the bundle folder (such as stage0.onnx or int8/stage0.onnx)")
    path = folder / name
    if not path.exists() and not path.is_symlink():
        raise BundleError(f"bundle {folder}: {what} file {name} is missing")
    if not path.resolve().is_relative_to(folder.resolve()):
        raise BundleError(f"bundle {folder}: {what} file {name} links outside the bundle folder; refusing it")
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"bundle {folder}: {what} file {name} is not a regular file")
    expected = rec.get("bytes")
    if verify:
        if isinstance(expected, bool) or not isinstance(expected, int) or not 0 < expected <= MAX_GRAPH_BYTES:
            raise BundleError(f"bundle {folder}: {what}: the manifest's size of {name} is {expected!r:.40}; "
                              f"expected a positive byte count")
        if st.st_size != expected:
            raise BundleError(f"bundle {folder}: {what} file {name} has {st.st_size} bytes, the manifest says "
                              f"{expected} (a different or truncated file)")
        digest = sha256_file(path)
        if digest != rec.get("sha256"):
            raise BundleError(f"bundle {folder}: {what} file {name} does not match the manifest's checksum (sha256 "
                              f"{digest[:12]}..., expected {str(rec.get('sha256'))[:12]}...); the files come from "
                              f"another export")
    return path


def check_graph_shapes(folder: Path, sess, what: str, input_shape: Sequence[int] | None = None,
                       input_name: str | None = None, num_classes: int | None = None,
                       logits_name: str = "logits") -> None:
    """Refuse a graph whose declared input size or class count disagrees with the manifest (ONNX Runtime would
    fail with INVALID_ARGUMENT at the first call, or numpy would broadcast the logits into wrong results)."""
    if not hasattr(sess, "get_inputs"):     # an ExecuTorch program: its method checks the shapes it is given
        return
    dims = {i.name: i.shape for i in sess.get_inputs()}
    dims.update({o.name: o.shape for o in sess.get_outputs()})
    if input_shape is not None and input_name in dims:
        got = list(dims[input_name])[1:]
        if len(got) != len(input_shape) or any(isinstance(g, int) and g != e for g, e in zip(got, input_shape)):
            raise BundleError(f"bundle {folder}: {what} takes inputs of shape (N, {', '.join(map(str, got))}); the "
                              f"manifest says (N, {', '.join(map(str, input_shape))})")
    if num_classes is not None and logits_name in dims:
        got = list(dims[logits_name])
        if len(got) != 2 or (isinstance(got[1], int) and got[1] != num_classes):
            raise BundleError(f"bundle {folder}: {what} outputs logits of shape {got}; the manifest says "
                              f"{num_classes} classes")


def _session(folder: Path, entry: dict, precision: str, threads: int, expect_in: list[str],
             expect_out: list[str], what: str, verify: bool, runtime: str = "onnxruntime"):
    from .onnx import onnx_session
    files = entry.get("files") if isinstance(entry, dict) else None
    files = files if isinstance(files, dict) else {}
    if precision not in files:
        raise BundleError(f"bundle {folder} has no {precision} graph for {what} (available: "
                          f"{sorted(files) or 'none'}; export with --quantize for int8)")
    rec = files[precision]
    path = bundle_file(folder, rec, what, verify)
    if runtime == "executorch":         # same driver, another session (see dyncnn.export.executorch)
        from .executorch import ExecuTorchSession
        sess = ExecuTorchSession(path, expect_in, expect_out, threads)
        if (sess.num_inputs, sess.num_outputs) != (len(expect_in), len(expect_out)):
            raise BundleError(f"bundle {folder}: {what} program {rec['file']} has {sess.num_inputs} inputs and "
                              f"{sess.num_outputs} outputs; the manifest says {expect_in} and {expect_out}")
        return sess
    try:
        ins, outs = graph_io(path)
    except Exception as e:       # onnx's DecodeError and friends: a file that is not an ONNX graph
        raise BundleError(f"bundle {folder}: {what} file {rec['file']} is not a readable ONNX graph: "
                          f"{type(e).__name__}") from None
    if sorted(ins) != sorted(expect_in) or outs != expect_out:
        raise BundleError(f"bundle {folder}: {what} file {rec['file']} has inputs {ins} and outputs {outs}; the "
                          f"manifest says {expect_in} and {expect_out}")
    return onnx_session(path, threads)


def load_bundle(folder: str | os.PathLike, precision: str = "fp32", threads: int = 1, verify: bool = True):
    """Load the bundle in ``folder`` for ``precision`` ("fp32" or "int8") with ``threads`` ONNX Runtime threads.

    Returns a :class:`DynamicBundle` (multi-exit) or :class:`StaticBundle`. Refuses, with the reason, a folder
    without a manifest, a manifest of another format version, and graph files that are missing, differ from the
    recorded checksum (``verify``) or whose inputs/outputs differ from the manifest.
    """
    if precision not in PRECISIONS:
        raise BundleError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if threads < 1:
        raise BundleError(f"threads must be >= 1, got {threads}")
    folder = Path(folder)
    manifest = _read_manifest(folder)
    runtime = manifest.get("runtime", "onnxruntime")
    if runtime not in RUNTIMES:
        raise BundleError(f"bundle {folder}: unknown runtime {runtime!r} (this dyncnn runs {RUNTIMES})")
    if runtime == "executorch":
        from .executorch import available
        if not available():
            raise BundleError(f"bundle {folder} holds ExecuTorch programs: install ExecuTorch with "
                              f"`pip install dyncnn[mobile]`")
    try:
        if manifest["kind"] == "glance":
            from .glance import GlanceBundle
            return GlanceBundle(folder, manifest, threads, verify)
        cls = DynamicBundle if manifest["kind"] == "multi_exit" else StaticBundle
        return cls(folder, manifest, precision, threads, verify)
    except (KeyError, TypeError, AttributeError, IndexError) as e:   # an entry of the wrong shape in the JSON
        raise BundleError(f"{folder / MANIFEST} is malformed ({type(e).__name__}: {e}); expected the manifest "
                          f"that `dyncnn export` writes") from None


def _as_batch(x: Any, shape: Sequence[int]) -> np.ndarray:
    """Validate an input batch against the exported (C, H, W) and return it as contiguous float32 numpy."""
    if type(x) is np.ndarray and x.dtype == np.float32 and x.ndim == 4 and x.shape[1:] == shape and \
            x.flags.c_contiguous:       # the common case, checked without conversions (batch-1 latency)
        if x.size and not np.isfinite(x.sum()) and not np.isfinite(x).all():
            raise DyncnnError(f"input: expected finite values, got {int((~np.isfinite(x)).sum())} NaN/Inf entries")
        return x
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise DyncnnError(f"input: expected a floating-point batch (float32 in [0, 1]), got {x.dtype}; "
                              f"convert with x.float() / 255")
        x = x.detach().cpu().float().numpy()
    if not isinstance(x, np.ndarray):
        raise InputTypeError(f"input: expected a numpy array or torch tensor of shape (N, {', '.join(map(str, shape))})"
                        f", got {type(x).__name__}")
    expected = f"(N, {', '.join(map(str, shape))})"
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape):
        hint = " (add a batch axis)" if x.ndim == 3 else ""
        raise DyncnnError(f"input: expected shape {expected} as exported, got {tuple(x.shape)}{hint}; the "
                          f"bundle's input size is fixed at export")
    if not np.issubdtype(x.dtype, np.floating):
        raise DyncnnError(f"input: expected a floating-point batch (float32 in [0, 1]), got {x.dtype}; convert "
                          f"with x.astype(np.float32) / 255")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.size and not np.isfinite(x.sum()) and not np.isfinite(x).all():   # the sum is the fast first look
        raise DyncnnError(f"input: expected finite values, got {int((~np.isfinite(x)).sum())} NaN/Inf entries")
    return x


class _Bundle:
    def __init__(self, folder: Path, manifest: dict, precision: str, threads: int):
        self.folder, self.manifest, self.precision, self.threads = folder, manifest, precision, threads
        self.runtime = manifest.get("runtime", "onnxruntime")
        self.input_shape = tuple(int(d) for d in manifest["input"]["shape"][1:])
        self.num_classes = int(manifest["num_classes"])
        self.session_seconds = 0.0      # time spent inside ONNX Runtime sessions (for the overhead share)

    def check_input(self, x: Any) -> np.ndarray:
        return _as_batch(x, self.input_shape)

    def _call(self, sess, names, feed):
        t0 = time.perf_counter()
        out = sess.run(names, feed)
        self.session_seconds += time.perf_counter() - t0
        return out


class StaticBundle(_Bundle):
    """One graph: ``run(x)`` returns the logits as a torch tensor, ``run_numpy(x)`` as numpy."""

    def __init__(self, folder: Path, manifest: dict, precision: str, threads: int, verify: bool):
        super().__init__(folder, manifest, precision, threads)
        g = manifest["graph"]
        self.sess = _session(folder, g, precision, threads, g.get("inputs"), g.get("outputs"), "the model graph",
                             verify, self.runtime)
        check_graph_shapes(folder, self.sess, "the model graph", self.input_shape, "input", self.num_classes)

    def run_numpy(self, x: Any) -> np.ndarray:
        x = self.check_input(x)
        return self._call(self.sess, None, {"input": x})[0]

    def run(self, x: Any):
        return torch.from_numpy(self.run_numpy(x))


@dataclass
class _Step:
    """One exit: stage ``k`` and its head, as the driver runs them."""
    sess: Any                                  # None: nothing to compute (identity stage, identity head)
    feed: list[tuple[str, int]]                # (ONNX input name, state leaf index)
    out_names: list[str]
    build: list[tuple[int, Any]]               # per output leaf: (0 graph | 1 input | 2 const, output pos/leaf/value)
    logits_leaf: int | None                    # the logits are this output leaf; None: the graph's last output
    last: bool


class DynamicBundle(_Bundle):
    """A multi-exit bundle; ``run(x, policy=None)`` returns the same ``ExitResult`` as eager ``infer``."""

    def __init__(self, folder: Path, manifest: dict, precision: str, threads: int, verify: bool):
        super().__init__(folder, manifest, precision, threads)
        self.num_exits = int(manifest["num_exits"])
        if not (len(manifest["stages"]) == len(manifest["exit_macs"]) == self.num_exits):
            raise BundleError(f"bundle {folder}: the manifest lists {len(manifest['stages'])} stages and "
                              f"{len(manifest['exit_macs'])} exit costs for {self.num_exits} exits")
        self.exit_macs = [int(m) for m in manifest["exit_macs"]]
        self._cum = np.asarray(self.exit_macs, dtype=np.int64)
        p = manifest["policy"]
        self.policy = ExitPolicy(p["thresholds"], p["criterion"], p.get("temperatures", []))
        self._steps: list[_Step] = []
        for k, st in enumerate(manifest["stages"]):
            graph_logits = st["logits"]["source"] == "graph"
            out_names = [f"out{j}" for j in st["outputs"]] + (["logits"] if graph_logits else [])
            sess = None
            if st["files"]:
                sess = _session(folder, st, precision, threads, [f"in{i}" for i in st["inputs"]], out_names,
                                f"stage {k}", verify, self.runtime)
                check_graph_shapes(folder, sess, f"stage {k}", self.input_shape if k == 0 else None, "in0",
                                   self.num_classes if graph_logits else None)
            elif graph_logits:
                raise BundleError(f"bundle {folder}: stage {k} takes its logits from a graph but has no file")
            pos = {j: n for n, j in enumerate(st["outputs"])}
            build = []
            for j, leaf in enumerate(st["state_out"]["leaves"]):
                if leaf.get("source") == "graph":
                    build.append((0, pos.get(j)))
                elif leaf.get("source") == "input":
                    build.append((1, int(leaf["index"])))
                else:
                    build.append((2, leaf.get("value")))
            self._steps.append(_Step(sess, [(f"in{i}", i) for i in st["inputs"]], out_names, build,
                                     None if graph_logits else int(st["logits"]["index"]),
                                     k == self.num_exits - 1))

    def _step(self, k: int, leaves: list) -> tuple[list, np.ndarray]:
        """Stage ``k`` and head ``k`` on ``leaves``: (the next state's leaves, the logits)."""
        g = self._steps[k]
        outs = self._call(g.sess, g.out_names, {n: leaves[i] for n, i in g.feed}) if g.sess is not None else ()
        if g.last:
            return leaves, outs[-1]
        new = [outs[a] if src == 0 else leaves[a] if src == 1 else a for src, a in g.build]
        return new, (outs[-1] if g.logits_leaf is None else np.asarray(new[g.logits_leaf], dtype=np.float32))

    def _policy(self, policy):
        if policy is None:
            return self.policy
        policy = ExitPolicy.of(policy)
        if len(policy.thresholds) not in (self.num_exits - 1, self.num_exits):
            raise DyncnnError(f"expected {self.num_exits - 1} thresholds (one per exit but the last), "
                              f"got {len(policy.thresholds)}")
        return policy

    def full_depth(self):
        """The policy that sends every sample to the last exit."""
        return ExitPolicy.never(self.num_exits)

    # -- inference ------------------------------------------------------------------------------------------
    def run_numpy(self, x: Any, policy=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(logits (N, C) float32, exit_index (N,) int64, macs (N,) int64)``; see the module docstring."""
        policy = self._policy(policy)
        x = self.check_input(x)
        n = x.shape[0]
        if n == 0:
            return (np.zeros((0, self.num_classes), dtype=np.float32), np.zeros(0, dtype=np.int64),
                    np.zeros(0, dtype=np.int64))
        if n == 1:
            logits, k = self._run_one(x, policy)
            return np.asarray(logits, dtype=np.float32), np.array([k], dtype=np.int64), self._cum[k:k + 1]
        rows = None                   # the original rows still in the batch; None: all of them
        exit_index = logits_out = None
        leaves: list = [x]
        last = self.num_exits - 1
        for k in range(self.num_exits):
            leaves, logits = self._step(k, leaves)
            if not logits_finite(logits):
                _non_finite(k, logits)
            if k == last or k >= len(policy.thresholds):
                done = None
            else:
                thr = np.float32(policy.thresholds[k])
                if thr == np.inf:        # no finite confidence reaches it: eager's decision, without the math
                    continue
                done = None if thr == -np.inf else \
                    confidence_np(logits, policy.criterion, policy.temperature(k)) >= thr
            if done is None or done.all():
                if rows is None:        # the whole batch leaves here together: no copies (batch-1 latency)
                    index = np.empty(n, dtype=np.int64)
                    index[:] = k
                    return np.asarray(logits, dtype=np.float32), index, self._cum[index]
                logits_out[rows] = logits
                exit_index[rows] = k
                break
            if done.any():
                if rows is None:
                    rows = np.arange(n)
                    exit_index = np.full(n, last, dtype=np.int64)
                    logits_out = np.zeros((n, self.num_classes), dtype=np.float32)
                logits_out[rows[done]] = logits[done]
                exit_index[rows[done]] = k
                keep = ~done
                leaves = [v[keep] if isinstance(v, np.ndarray) else v for v in leaves]
                rows = rows[keep]
        # every sample ran every stage and head up to its exit: the ledger is the exit's cumulative cost
        return logits_out, exit_index, self._cum[exit_index]

    def _run_one(self, x: np.ndarray, policy: ExitPolicy) -> tuple[np.ndarray, int]:
        """One sample: the batched loop's decisions without its row bookkeeping, and the cheap exit test
        (:func:`exit_test_one`); returns (logits (1, C), exit index)."""
        leaves: list = [x]
        last = min(self.num_exits - 1, len(policy.thresholds))
        for k in range(self.num_exits):
            leaves, logits = self._step(k, leaves)
            thr = np.float32(policy.thresholds[k]) if k < last else None
            if one_sample_leaves(k, logits, k == last, thr, policy.criterion, policy.temperature(k)):
                return logits, k
        raise AssertionError("unreachable: the last exit returns")

    def stage_latency_ms(self, images: Any, repeats: int = 3) -> list[float]:
        """Median milliseconds of each exit's step at batch 1 (stage graph + head + the driver's bookkeeping),
        every image of ``images`` (N, C, H, W) run to full depth ``repeats`` times after one warm-up pass.

        Their running sum is the latency of leaving at each exit: the cost table for latency budgets
        (``dyncnn calibrate --budget-ms``), stored in the manifest by :func:`record_stage_latency`.
        """
        x = self.check_input(images)
        if x.shape[0] == 0:
            raise DyncnnError("stage latencies need at least one image")
        times: list[list[float]] = [[] for _ in range(self.num_exits)]
        for rep in range(repeats + 1):
            for i in range(x.shape[0]):
                leaves: list = [x[i:i + 1]]
                for k in range(self.num_exits):
                    t0 = time.perf_counter()
                    leaves, logits = self._step(k, leaves)
                    values = row_values(logits)        # the checks and exit test the driver makes after each stage
                    if logits_finite(logits, values):
                        exit_test_one(logits, values, "max_prob", 1.0, np.float32(0.5))
                    if rep:
                        times[k].append((time.perf_counter() - t0) * 1e3)
        return [float(np.median(t)) for t in times]

    def run(self, x: Any, policy=None):
        """Early-exit inference as eager ``infer``: an ``ExitResult`` of torch tensors."""
        from ..dynamic.executor import ExitResult
        logits, exit_index, macs = self.run_numpy(x, policy)
        return ExitResult(torch.from_numpy(logits), torch.from_numpy(exit_index), torch.from_numpy(macs))

    def single_graph(self):
        """The bundle's ``torch.cond`` single-graph form (exported with ``single_graph=True``) as a
        :class:`~dyncnn.export.cond.CondGraph`; per-batch exit condition, see :mod:`dyncnn.export.cond`."""
        from .cond import CondGraph
        entry = self.manifest.get("single_graph")
        if not entry:
            raise BundleError(f"bundle {self.folder} has no single graph (export with single_graph=True / "
                              f"--single-graph)")
        sess = _session(self.folder, entry, "fp32", self.threads, entry["inputs"], entry["outputs"],
                        "the single graph", True)
        return CondGraph(self.folder / entry["files"]["fp32"]["file"], self.exit_macs, self.input_shape,
                         self.threads, sess)

    def exit_logits(self, x: Any, feeds: dict | None = None) -> list[np.ndarray]:
        """Every exit's logits for every sample (full depth, no compaction), as eager ``model(x)``.

        With ``feeds`` (a dict), appends each stage graph's input feed to ``feeds[k]``: the calibration data of
        INT8 quantization.
        """
        x = self.check_input(x)
        leaves: list = [x]
        outs = []
        for k, g in enumerate(self._steps):
            if feeds is not None and g.sess is not None:
                feeds.setdefault(k, []).append({n: leaves[i] for n, i in g.feed})
            leaves, logits = self._step(k, leaves)
            outs.append(logits)
        return outs


def record_stage_latency(folder: str | os.PathLike, stage_ms: Sequence[float], threads: int,
                         machine: str | None = None) -> dict:
    """Store measured per-exit batch-1 latencies (ms, ONNX Runtime, ``threads`` threads) in the bundle manifest
    under ``stage_latency_ms[str(threads)]``; returns the manifest. Latencies are a property of the machine that
    measured them, which is recorded beside them."""
    import platform
    from .staged import write_manifest
    folder = Path(folder)
    manifest = _read_manifest(folder)
    if manifest["kind"] != "multi_exit" or len(stage_ms) != int(manifest["num_exits"]):
        raise BundleError(f"bundle {folder}: expected {manifest.get('num_exits')} stage latencies for a multi-exit "
                          f"bundle, got {len(stage_ms)} for a {manifest['kind']} bundle")
    if any(not (float(t) > 0 and math.isfinite(float(t))) for t in stage_ms):
        raise BundleError(f"stage latencies must be positive and finite, got {list(stage_ms)}")
    table = manifest.setdefault("stage_latency_ms", {})
    table[str(int(threads))] = {"stage_ms": [float(t) for t in stage_ms],
                                "cumulative_ms": np.cumsum(np.asarray(stage_ms, dtype=np.float64)).tolist(),
                                "batch": 1, "runtime": "onnxruntime",
                                "machine": machine or f"{platform.machine()} {platform.processor() or ''}".strip()}
    write_manifest(folder, manifest)
    return manifest


def stage_latency_table(manifest: dict, threads: int) -> list[float] | None:
    """Cumulative ms of leaving at each exit recorded for ``threads`` threads, or None when not measured."""
    entry = (manifest.get("stage_latency_ms") or {}).get(str(int(threads)))
    return [float(t) for t in entry["cumulative_ms"]] if entry else None
