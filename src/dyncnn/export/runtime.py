"""The host-side driver of an exported bundle: ONNX Runtime sessions plus the exit policy, in numpy.

``load_bundle(dir)`` checks the bundle before it loads anything (manifest present, of this format and valid, every
graph file present with the recorded size and SHA-256, each session's input and output names and per-sample shapes as
the manifest says: :mod:`.bundle_format`) and returns a
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

import math
import numbers
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..dynamic.policy import ExitPolicy
from ..errors import DyncnnError
from .bundle_format import (MANIFEST, RUNTIMES, THREADS_PER_STAGE, BundleError, bundle_file, bundle_lock,
                            check_graph_shapes, graph_io, read_manifest, stage_io_shapes, write_manifest)
from .host import (SCREEN_MARGIN, _as_batch, _non_finite, confidence_np, exit_test_one, logits_finite,  # noqa: F401
                   one_sample_leaves, row_values)

_read_manifest = read_manifest      # the name the CLI imports (to go when the CLI imports bundle_format)

PRECISIONS = ("fp32", "int8")


def _session(folder: Path, entry: dict, precision: str, threads: int, expect_in: list[str],
             expect_out: list[str], what: str, verify: bool, runtime: str = "onnxruntime", spin: bool = True):
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
    return onnx_session(path, threads, spin)


def load_bundle(folder: str | os.PathLike, precision: str = "fp32", threads: int | str | Sequence[int] = 1,
                verify: bool = True, spin: bool | None = None):
    """Load the bundle in ``folder`` for ``precision`` ("fp32" or "int8") with ``threads`` ONNX Runtime threads,
    or with ``threads="per-stage"``: each stage's own session with the thread count recorded for it in the
    manifest (:func:`record_stage_threads`; in a run, that of the recorded batch size nearest the rows the run
    started with, in every stage), or with a list of counts, one per stage. ``spin``: whether the threads of a
    multi-thread session keep spinning after a run (ONNX Runtime's default) or stop when it ends
    (:func:`dyncnn.export.onnx.onnx_session`);
    None: they keep spinning in a static bundle (one graph: at most one of its sessions has a pool), and stop in a
    multi-exit bundle, where the pool of the stage that ran last would take the cores that the next stage's
    session runs on.

    Returns a :class:`DynamicBundle` (multi-exit) or :class:`StaticBundle`. Refuses, with the reason, a folder
    without a manifest, a manifest of another format version, and graph files that are missing, differ from the
    recorded checksum (``verify``) or whose inputs/outputs differ from the manifest.
    """
    if precision not in PRECISIONS:
        raise BundleError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if isinstance(threads, (list, tuple)):
        if not threads or not all(_is_count(t) for t in threads):
            raise BundleError(f"threads: a list gives one positive thread count per stage, got {threads!r}")
        threads = tuple(int(t) for t in threads)
    elif threads != THREADS_PER_STAGE and not _is_count(threads):
        raise BundleError(f"threads must be a positive integer, {THREADS_PER_STAGE!r} or one count per stage, got "
                          f"{threads!r}")
    folder = Path(folder)
    manifest = read_manifest(folder)
    runtime = manifest.get("runtime", "onnxruntime")
    if runtime not in RUNTIMES:
        raise BundleError(f"bundle {folder}: unknown runtime {runtime!r} (this dyncnn runs {RUNTIMES})")
    if (threads == THREADS_PER_STAGE or isinstance(threads, tuple)) and \
            (runtime != "onnxruntime" or manifest["kind"] == "glance"):
        raise BundleError(f"bundle {folder}: threads={threads!r} needs an ONNX Runtime bundle of kind "
                          f"static or multi_exit (ExecuTorch has one thread pool per process), got a "
                          f"{runtime} bundle of kind {manifest['kind']!r}; give a thread count")
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
        return cls(folder, manifest, precision, threads, verify,
                   cls is StaticBundle if spin is None else bool(spin))
    except (KeyError, TypeError, AttributeError, IndexError) as e:   # an entry of the wrong shape in the JSON
        raise BundleError(f"{folder / MANIFEST} is malformed ({type(e).__name__}: {e}); expected the manifest "
                          f"that `dyncnn export` writes") from None


def _is_count(t: object) -> bool:
    return not isinstance(t, bool) and isinstance(t, numbers.Integral) and t >= 1


def thread_plan(manifest: dict, stages: int, threads: int | str | Sequence[int]) -> list[list[tuple[float, int]]]:
    """Per stage, the thread count of its session(s): ``[(from_rows, threads), ...]`` in increasing ``from_rows``
    (the first from 0). With an integer ``threads``, that count everywhere; with a list, its count for each stage
    at every batch size; with ``"per-stage"``, the manifest's table (:func:`stage_threads_table`): a run of ``n``
    rows uses the counts recorded for the batch size nearest ``n`` on a log scale (with batches 1 and 64 recorded,
    the boundary lies at 8 rows) in every stage, also where the later stages get fewer rows (those that did not
    leave), as :func:`measure_stage_plans` timed the plan (whole runs of such batches, every stage on its
    count). Chosen by the rows each stage got instead, a batch of 64 whose last stage got 5 rows ran that stage
    on the batch-1 count, a plan that was never measured (the headline's multi-stage network: 0.167 ms per image
    per stage against 0.139 with 2 threads everywhere, the plan recorded for batch 64)."""
    if isinstance(threads, (list, tuple)):
        if len(threads) != stages:
            raise BundleError(f"threads: expected one count per stage ({stages}), got {list(threads)}")
        return [[(0.0, int(t))] for t in threads]
    if threads != THREADS_PER_STAGE:
        return [[(0.0, int(threads))] for _ in range(stages)]
    table = stage_threads_table(manifest)
    if table is None:
        raise BundleError(f"the bundle records no thread count per stage (no stage_threads in its {MANIFEST}); "
                          f"measure them with dyncnn.export.runtime.measure_stage_threads and record_stage_threads, "
                          f"or give a thread count")
    batches = sorted(table)
    bounds = [0.0] + [math.sqrt(a * b) for a, b in zip(batches, batches[1:])]
    plan = []
    for k in range(stages):
        steps: list[tuple[float, int]] = []
        for lo, b in zip(bounds, batches):
            if not steps or steps[-1][1] != table[b][k]:
                steps.append((lo, table[b][k]))
        plan.append(steps)
    return plan


def per_stage_as_uniform(manifest: dict, batch: int) -> int | None:
    """The thread count ``t`` with which ``load_bundle(..., threads="per-stage")`` runs batches of ``batch`` rows
    on the same sessions as ``threads=t``: where the counts its manifest records for the batch size nearest
    ``batch`` (:func:`thread_plan`, every stage of the run) are ``t`` everywhere; None where they mix counts or
    none are recorded. A timing of "per stage" there is a second timing of the same thing: its difference from
    the first is the machine's noise alone."""
    if stage_threads_table(manifest) is None:
        return None
    stages = int(manifest["num_exits"]) if manifest.get("kind") == "multi_exit" else 1
    plan = thread_plan(manifest, stages, THREADS_PER_STAGE)
    used = {_pick(steps[0][1], tuple(steps[1:]), batch) for steps in plan}     # the driver's choice (_pick)
    return used.pop() if len(used) == 1 else None


def _pick(sess, more: tuple, n: int):
    """The session of a call of ``n`` rows: ``sess``, or the last of ``more`` ((from_rows, session), ...) that
    ``n`` reaches."""
    for lo, s in more:
        if n >= lo:
            sess = s
    return sess


class _Bundle:
    def __init__(self, folder: Path, manifest: dict, precision: str, threads: int | str, spin: bool = True):
        self.folder, self.manifest, self.precision, self.threads = folder, manifest, precision, threads
        self.spin = spin                # whether a multi-thread session's threads spin after a run (load_bundle)
        self.runtime = manifest.get("runtime", "onnxruntime")
        self.input_shape = tuple(int(d) for d in manifest["input"]["shape"][1:])
        self.num_classes = int(manifest["num_classes"])
        self.session_seconds = 0.0      # time spent inside ONNX Runtime sessions (for the overhead share)

    def _sessions(self, plan: list[tuple[float, int]], entry: dict, expect_in, expect_out, what: str,
                  verify: bool, shapes: dict, num_classes: int | None) -> tuple[Any, tuple]:
        """The sessions of one graph for its ``plan`` (:func:`thread_plan`): the first, and ``((from_rows,
        session), ...)`` of the others (empty with one thread count); the file is hashed once."""
        out = []
        for i, (lo, t) in enumerate(plan):
            sess = _session(self.folder, entry, self.precision, t, expect_in, expect_out, what, verify and i == 0,
                            self.runtime, self.spin)
            check_graph_shapes(self.folder, sess, what, shapes, num_classes)
            out.append((lo, sess))
        return out[0][1], tuple(out[1:])

    def check_input(self, x: Any) -> np.ndarray:
        return _as_batch(x, self.input_shape)

    def _call(self, sess, names, feed):
        t0 = time.perf_counter()
        inner = getattr(sess, "_sess", None)
        if inner is not None:   # an ONNX Runtime session: its C++ run, without the Python wrapper's checks of
            out = inner.run(names, feed, None)   # the feed's names (compared with the graph at load) and of
        else:                                    # OrtValues (none passed): ~2 us a call, against 0.03-0.3 ms stages
            out = sess.run(names, feed)
        self.session_seconds += time.perf_counter() - t0
        return out


class StaticBundle(_Bundle):
    """One graph: ``run(x)`` returns the logits as a torch tensor, ``run_numpy(x)`` as numpy."""

    def __init__(self, folder: Path, manifest: dict, precision: str, threads: int | str, verify: bool,
                 spin: bool = True):
        super().__init__(folder, manifest, precision, threads, spin)
        g = manifest["graph"]
        self.thread_plan = thread_plan(manifest, 1, threads)
        self.sess, self._more = self._sessions(self.thread_plan[0], g, g.get("inputs"), g.get("outputs"),
                                               "the model graph", verify, {"input": self.input_shape},
                                               self.num_classes)
        self._out_names = list(g.get("outputs"))     # checked against the graph's by _session

    def run_numpy(self, x: Any) -> np.ndarray:
        x = self.check_input(x)
        sess = _pick(self.sess, self._more, x.shape[0]) if self._more else self.sess
        return self._call(sess, self._out_names, {"input": x})[0]

    def stage_pass_ms(self, chunks: Sequence[np.ndarray]) -> list[float]:
        """Mean milliseconds of the graph's session call on each of ``chunks`` (checked batches): the one
        stage's entry of :func:`measure_stage_threads`."""
        t0 = time.perf_counter()
        for c in chunks:
            self._call(self.sess, self._out_names, {"input": c})
        return [(time.perf_counter() - t0) * 1e3 / len(chunks)]

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
    more: tuple = ()                           # ((from_rows, session), ...): per-stage threads by batch size


class DynamicBundle(_Bundle):
    """A multi-exit bundle; ``run(x, policy=None)`` returns the same ``ExitResult`` as eager ``infer``."""

    def __init__(self, folder: Path, manifest: dict, precision: str, threads: int | str, verify: bool,
                 spin: bool = True):
        super().__init__(folder, manifest, precision, threads, spin)
        self.num_exits = int(manifest["num_exits"])      # stages and exit costs: one each (validate_manifest)
        self.thread_plan = thread_plan(manifest, self.num_exits, threads)
        self.exit_macs = [int(m) for m in manifest["exit_macs"]]
        self._cum = np.asarray(self.exit_macs, dtype=np.int64)
        p = manifest["policy"]
        self.policy = ExitPolicy(p["thresholds"], p["criterion"], p.get("temperatures", []))
        self._steps: list[_Step] = []
        for k, st in enumerate(manifest["stages"]):
            graph_logits = st["logits"]["source"] == "graph"
            out_names = [f"out{j}" for j in st["outputs"]] + (["logits"] if graph_logits else [])
            sess, more = None, ()
            if st["files"]:
                shapes = {**stage_io_shapes(st), **({"in0": self.input_shape} if k == 0 else {})}
                sess, more = self._sessions(self.thread_plan[k], st, [f"in{i}" for i in st["inputs"]], out_names,
                                            f"stage {k}", verify, shapes, self.num_classes if graph_logits else None)
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
                                     k == self.num_exits - 1, more))

    def _step(self, k: int, leaves: list, batch: int | None = None) -> tuple[list, np.ndarray]:
        """Stage ``k`` and head ``k`` on ``leaves``: (the next state's leaves, the logits). ``batch``: the rows
        the run started with, which pick the session where the stage has one per batch size (default: the rows
        ``leaves`` hold, as at full depth)."""
        g = self._steps[k]
        if g.sess is None:
            outs = ()
        else:
            feed = {n: leaves[i] for n, i in g.feed}
            rows = leaves[g.feed[0][1]].shape[0] if batch is None else batch
            sess = _pick(g.sess, g.more, rows) if g.more else g.sess
            outs = self._call(sess, g.out_names, feed)
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
            leaves, logits = self._step(k, leaves, n)     # every stage on the counts of the run's batch size
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

    def stage_pass_ms(self, chunks: Sequence[np.ndarray]) -> list[float]:
        """Mean milliseconds of each stage's step (its graph and head, no exit test) over ``chunks`` (checked
        batches) run to full depth: the per-stage entry of :func:`measure_stage_threads`."""
        times = [0.0] * self.num_exits
        for c in chunks:
            leaves: list = [c]
            for k in range(self.num_exits):
                t0 = time.perf_counter()
                leaves, _ = self._step(k, leaves)
                times[k] += time.perf_counter() - t0
        return [t * 1e3 / len(chunks) for t in times]

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
        threads = max(t for plan in self.thread_plan for _, t in plan)     # one graph: the most any stage uses
        sess = _session(self.folder, entry, "fp32", threads, entry["inputs"], entry["outputs"],
                        "the single graph", True)
        return CondGraph(self.folder / entry["files"]["fp32"]["file"], self.exit_macs, self.input_shape,
                         threads, sess)

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
    folder = Path(folder)
    with bundle_lock(folder):
        return _record_stage_latency(folder, stage_ms, threads, machine or
                                     f"{platform.machine()} {platform.processor() or ''}".strip())


def _record_stage_latency(folder: Path, stage_ms: Sequence[float], threads: int, machine: str) -> dict:
    manifest = read_manifest(folder)
    if manifest["kind"] != "multi_exit" or len(stage_ms) != int(manifest["num_exits"]):
        raise BundleError(f"bundle {folder}: expected {manifest.get('num_exits')} stage latencies for a multi-exit "
                          f"bundle, got {len(stage_ms)} for a {manifest['kind']} bundle")
    if any(not (float(t) > 0 and math.isfinite(float(t))) for t in stage_ms):
        raise BundleError(f"stage latencies must be positive and finite, got {list(stage_ms)}")
    table = manifest.setdefault("stage_latency_ms", {})
    table[str(int(threads))] = {"stage_ms": [float(t) for t in stage_ms],
                                "cumulative_ms": np.cumsum(np.asarray(stage_ms, dtype=np.float64)).tolist(),
                                "batch": 1, "runtime": "onnxruntime", "machine": machine}
    write_manifest(folder, manifest)
    return manifest


def stage_latency_table(manifest: dict, threads: int) -> list[float] | None:
    """Cumulative ms of leaving at each exit recorded for ``threads`` threads, or None when not measured."""
    entry = (manifest.get("stage_latency_ms") or {}).get(str(int(threads)))
    return [float(t) for t in entry["cumulative_ms"]] if entry else None


def _batches(x: np.ndarray, b: int) -> list[np.ndarray]:
    """``x`` (N, ...) cut into calls of ``b`` rows (a remainder dropped); with fewer than ``b`` rows, one call of
    ``x`` repeated to ``b`` rows."""
    return [x[i:i + b] for i in range(0, x.shape[0] - b + 1, b)] or \
        [np.ascontiguousarray(np.resize(x, (b, *x.shape[1:])))]


def _interleaved(groups: Sequence[Sequence[tuple[Any, Any, Any]]], rounds: int, settle_s: float) -> list[dict]:
    """Each group's passes ``(key, timed, prime)`` run ``rounds`` times, interleaved: in round ``r`` the groups in
    an order rotated by ``r``, and within each group its passes in an order rotated by ``r``; with ``settle_s``,
    each pass waits that long first and calls ``prime()`` (untimed), then ``timed()`` gives its figure. Returns per
    group ``{key: [figure per round]}``, the rounds paired."""
    out: list[dict] = [{k: [] for k, _, _ in g} for g in groups]
    for r in range(rounds):
        first = r % len(groups)
        for j in [*range(first, len(groups)), *range(first)]:
            g = list(groups[j])
            shift = r % len(g)
            for key, timed, prime in g[shift:] + g[:shift]:
                if settle_s:
                    time.sleep(settle_s)
                    prime()
                out[j][key].append(timed())
    return out


def measure_stage_threads(folder: str | os.PathLike, images: Any, candidates: Sequence[int] = (1, 2),
                          batch_sizes: Sequence[int] = (1,), rounds: int = 3, precision: str = "fp32",
                          settle_s: float = 0.0) -> dict[int, dict[int, list[float]]]:
    """Milliseconds per call of each stage of the bundle in ``folder`` (one stage: a static bundle's graph) with
    each of ``candidates`` intra-op thread counts, at each of ``batch_sizes``: ``{batch: {threads: [ms per
    stage]}}``, the median over ``rounds`` passes over ``images`` (N, C, H, W) at full depth, the thread counts
    interleaved within each round (rotated between rounds) after a warm-up pass, so that a change of load hits
    them alike; their sessions' threads spin or stop after a run as the per-stage driver's do (``load_bundle``'s
    ``spin``). A batch larger than ``images`` repeats them. With ``settle_s``, each pass waits that long first
    and makes one untimed call, as ``dyncnn frontier`` times: back to back, a 2-thread session of a small 64x64
    network ran a batch of 64 in 0.34 ms (tiny-S /2: 0.60 with 1 thread), and after the frontier's pause in 0.65-1.73
    ms (0.73-0.75 with 1 thread), so that the count recorded back to back lost in the frontier's timing by up to
    2.3x. Feed it to :func:`record_stage_threads`; several bundles at once: :func:`measure_stage_threads_many`."""
    return measure_stage_threads_many([folder], images, candidates, batch_sizes, rounds, precision, settle_s)[0]


def measure_stage_threads_many(folders: Sequence[str | os.PathLike], images: Any, candidates: Sequence[int] = (1, 2),
                               batch_sizes: Sequence[int] = (1,), rounds: int = 3, precision: str = "fp32",
                               settle_s: float = 0.0) -> list[dict[int, dict[int, list[float]]]]:
    """:func:`measure_stage_threads` of every bundle in ``folders`` (one result each, in their order), their passes
    interleaved: in each round every bundle takes its turn (their order rotated between rounds), so that one
    bundle's rounds lie as far apart as the whole measurement allows.

    Why: on a 2-core virtual machine a 2-thread session at batch 1 runs in two modes (the headline's tiny-M at
    128x128: 0.25 ms per image in 89 of 120 passes of 100 images, 0.41-0.66 ms in the other 31, which came in runs
    of several passes; 1 thread: 0.40; the cause not traced, /proc/stat shows no steal). Measured one bundle after
    another, a bundle's rounds all fall within a few seconds, and a slow run decides its count for good: in the
    10-epoch headline runs four of twelve measurements recorded 1 thread for tiny-M at batch 1, where 2 threads
    were 1.6x faster in every timing of the same runs (each a minute long, its rounds spread over it). Spread
    rounds make that rarer, not impossible: the timing that follows can still meet the other mode."""
    if not candidates or not batch_sizes or rounds < 1:
        raise DyncnnError(f"give thread counts, batch sizes and rounds >= 1, got {candidates}, {batch_sizes}, "
                          f"{rounds}")
    if not folders:
        return []
    per_folder = []
    for folder in folders:
        bundles = {int(t): load_bundle(folder, precision, threads=int(t)) for t in candidates}
        first = next(iter(bundles.values()))
        if first.runtime != "onnxruntime" or not hasattr(first, "stage_pass_ms"):
            raise BundleError(f"bundle {folder}: thread counts per stage are measured for ONNX Runtime bundles of "
                              f"kind static or multi_exit")
        x = first.check_input(images)
        if x.shape[0] == 0:
            raise DyncnnError("stage thread counts need at least one image")
        per_folder.append((bundles, x))
    out: list[dict[int, dict[int, list[float]]]] = [{} for _ in folders]
    for b in batch_sizes:
        b = int(b)
        groups = []
        for bundles, x in per_folder:
            chunks = _batches(x, b)
            for bundle in bundles.values():
                bundle.stage_pass_ms(chunks[:4])        # warm-up: sessions, allocators, caches
            # untimed after the pause: caches warm again
            groups.append([(t, lambda bd=bd, c=chunks: bd.stage_pass_ms(c),
                            lambda bd=bd, c=chunks: bd.stage_pass_ms(c[:1])) for t, bd in bundles.items()])
        for j, per in enumerate(_interleaved(groups, rounds, settle_s)):
            out[j][b] = {t: np.median(np.asarray(v), axis=0).tolist() for t, v in per.items()}
    return out


MAX_PLANS = 32      # measure_stage_plans tries every assignment up to this many, else the uniform ones


def measure_stage_plans(folder: str | os.PathLike, images: Any, candidates: Sequence[int] = (1, 2),
                        policy=None, rounds: int = 3, precision: str = "fp32",
                        extra: Sequence[Sequence[int]] = (), settle_s: float = 0.0, batch: int = 1,
                        per_round: bool = False) -> dict[tuple[int, ...], Any]:
    """Milliseconds per image of the multi-exit bundle in ``folder`` run ``batch`` images a call (one by default)
    under ``policy`` (default: the manifest's), for each assignment of ``candidates`` thread counts to its stages
    (a *plan*): every assignment while there are at most :data:`MAX_PLANS`, else one count everywhere plus
    ``extra``. Median over ``rounds`` passes over ``images`` (a batch larger than ``images`` repeats them), the
    plans interleaved (rotated between rounds) after a warm-up pass; with ``settle_s``, each pass waits that long
    first and makes one untimed call, as ``dyncnn frontier`` times (the cores idle before a pass, as between the
    frames a phone classifies).

    Why whole runs under the exit pattern: stage by stage at full depth (:func:`measure_stage_threads`), a
    2-thread stage after a 1-thread one looks faster; deployed at batch 1, where most images leave early and the
    second core idles between the calls that reach that stage, waking its pool costs more than the thread saves
    (the headline's searched cascade, configuration A seed 0, on validation images with the frontier's pauses:
    0.43 ms per image with 1 thread everywhere, 0.69 ms with its later members on 2 threads, the counts that
    stage-by-stage measurement picks). At a larger batch the later stages get only the rows that did not leave,
    where a second thread pays less than at the full batch that stage-by-stage measurement times (the 64x64
    ``full`` preset at batch 64: its multi-exit models recorded 2 threads for every stage and ran slower than with
    1). Feed the result to :func:`record_stage_threads` (``plans``, or ``batch_plans`` per batch size).

    ``per_round``: every plan's milliseconds in each round instead of their median, paired (round ``r`` of every
    plan ran within the same round), for the paired choice of :func:`pick_plan`. Several bundles at once:
    :func:`measure_stage_plans_many`."""
    return measure_stage_plans_many([(folder, policy, extra)], images, candidates, rounds, precision, settle_s,
                                    batch, per_round)[0]


def measure_stage_plans_many(jobs: Sequence[tuple[str | os.PathLike, Any, Sequence[Sequence[int]]]], images: Any,
                             candidates: Sequence[int] = (1, 2), rounds: int = 3, precision: str = "fp32",
                             settle_s: float = 0.0, batch: int = 1, per_round: bool = False
                             ) -> list[dict[tuple[int, ...], Any]]:
    """:func:`measure_stage_plans` of several bundles, ``jobs`` of ``(folder, policy, extra)`` (policy None: the
    manifest's), one result each in their order, their passes interleaved round by round as
    :func:`measure_stage_threads_many` interleaves (and for the same reason: a slow phase of the machine then
    hits one round of a bundle, not all of them)."""
    import itertools
    if not candidates or rounds < 1:
        raise DyncnnError(f"give thread counts and rounds >= 1, got {candidates}, {rounds}")
    if not _is_count(batch):
        raise DyncnnError(f"batch must be a positive integer, got {batch!r}")
    cands = sorted({int(t) for t in candidates})
    groups = []
    for folder, policy, extra in jobs:
        manifest = read_manifest(Path(folder))
        if manifest["kind"] != "multi_exit" or manifest.get("runtime", "onnxruntime") != "onnxruntime":
            raise BundleError(f"bundle {folder}: plans of thread counts are measured for ONNX Runtime multi-exit "
                              f"bundles, got a {manifest.get('runtime', 'onnxruntime')} bundle of kind "
                              f"{manifest['kind']!r}")
        stages = int(manifest["num_exits"])
        if len(cands) ** stages <= MAX_PLANS:
            plans = list(itertools.product(cands, repeat=stages))
        else:
            plans = [(t,) * stages for t in cands]
        for e in extra:
            if len(e) != stages or not all(_is_count(t) for t in e):
                raise DyncnnError(f"extra plans give one thread count per stage ({stages}), got {list(e)}")
            if tuple(int(t) for t in e) not in plans:
                plans.append(tuple(int(t) for t in e))
        bundles = {plan: load_bundle(folder, precision, threads=plan) for plan in plans}
        first = next(iter(bundles.values()))
        pol = first.policy if policy is None else first._policy(policy)
        x = first.check_input(images)
        if x.shape[0] == 0:
            raise DyncnnError("plans of thread counts need at least one image")
        calls = _batches(x, batch)
        for b in bundles.values():                          # warm-up: sessions, allocators, caches
            for batch_x in calls:
                b.run_numpy(batch_x, pol)
        groups.append([(plan, _whole_run(bundles[plan].run_numpy, calls, pol, batch),
                        lambda run=bundles[plan].run_numpy, c=calls[0], p=pol: run(c, p)) for plan in plans])
    found = _interleaved(groups, rounds, settle_s)
    if per_round:
        return [{p: [float(t) for t in v] for p, v in per.items()} for per in found]
    return [{p: float(np.median(v)) for p, v in per.items()} for per in found]


def _whole_run(run, calls: list[np.ndarray], policy, batch: int):
    """A timed pass of :func:`measure_stage_plans_many`: milliseconds per image of ``run`` over ``calls``."""
    def timed() -> float:
        t0 = time.perf_counter()
        for batch_x in calls:
            run(batch_x, policy)
        return (time.perf_counter() - t0) * 1e3 / (len(calls) * batch)
    return timed


def pick_plan(found: dict[tuple[int, ...], Any], margin: float = 0.05) -> tuple[int, ...]:
    """The plan to record among measured ones (:func:`measure_stage_plans`).

    With one figure per plan (milliseconds per image): the fastest, or, within ``margin`` of it, the plan with the
    fewest threads in all. With each plan's figures per round (``per_round=True``, paired), the plan of one count
    everywhere with the lowest median (the fewest threads within ``margin``) is the reference, and a mixed plan must
    earn its place against it: it replaces the reference only when it ran faster in every round and its median
    ratio to the reference, round by round, is at most ``1 - margin``. Of the reference and the mixed plans that
    beat it, the one of the lowest median ratio wins, or, within ``margin`` of that, the one of the fewest threads.

    Why paired, and every round: taking the fastest median of eight or more noisy plans favours the lucky one
    (the winner's curse of the cascade search again), and the mixed plans are most of them. Between the uniform
    plans (two, with counts 1 and 2) the median decides: a single slow round must not keep 2 threads from a
    stage where they halve the time. Measured with ``benchmarks/bench_plan_rule.py``: see
    docs/deployment.md ("Threads per stage")."""
    if not found:
        raise DyncnnError("no measured plans to pick from")
    plans = list(found)
    per_round = [isinstance(v, (list, tuple)) for v in found.values()]
    if any(per_round) and not all(per_round):
        raise DyncnnError("give every plan one figure, or every plan its figures per round, not both")
    if not any(per_round):
        fastest = min(float(v) for v in found.values())
        return min((p for p in plans if float(found[p]) <= fastest * (1 + margin)),
                   key=lambda p: (sum(p), float(found[p])))
    uniform = [p for p in plans if len(set(p)) == 1]
    if not uniform:
        raise DyncnnError(f"plans timed per round need the plans of one count everywhere as their reference, got "
                          f"{sorted(plans)}")
    rounds = {len(v) for v in found.values()}
    if len(rounds) != 1 or 0 in rounds:
        raise DyncnnError(f"plans timed per round need the same number of rounds each (paired), got "
                          f"{sorted(rounds)}")
    med = {p: float(np.median(v)) for p, v in found.items()}
    fastest = min(med[p] for p in uniform)
    ref = min((p for p in uniform if med[p] <= fastest * (1 + margin)), key=lambda p: (sum(p), med[p]))

    def ratio(p: tuple[int, ...]) -> float | None:
        """p's median ratio to the reference when it beats it, else None."""
        r = [float(a) / float(b) if b > 0 else math.inf for a, b in zip(found[p], found[ref])]
        m = float(np.median(r))
        return m if max(r) < 1 and m <= 1 - margin else None

    beats = {ref: 1.0, **{p: r for p in plans if p not in uniform and (r := ratio(p)) is not None}}
    best = min(beats.values())
    return min((p for p, r in beats.items() if r <= best * (1 + margin)), key=lambda p: (sum(p), beats[p]))


def _plan_key(plan: Sequence[int]) -> str:
    return "-".join(str(int(t)) for t in plan)


def record_stage_threads(folder: str | os.PathLike, measured: dict[int, dict[int, Sequence[float]]],
                         machine: str | None = None, margin: float = 0.05,
                         plans: dict[tuple[int, ...], Any] | None = None,
                         batch_plans: dict[int, dict[tuple[int, ...], Any]] | None = None) -> dict:
    """Store in the bundle manifest, under ``stage_threads``, per batch size of ``measured``
    (:func:`measure_stage_threads`: ``{batch: {threads: [ms per stage]}}``) the thread count that ran each stage
    fastest beside every candidate's milliseconds; returns the manifest. What ``load_bundle(folder,
    threads="per-stage")`` runs. More threads must be faster by more than ``margin`` (5%): the fewest threads
    within that of the fastest win, so that noise does not hand a stage a thread pool (and the cores it takes from
    the rest of the machine) for nothing. With ``plans`` (:func:`measure_stage_plans`: whole runs at batch 1 under
    the exit pattern), batch 1 takes instead the plan that :func:`pick_plan` picks (the fastest, the fewest threads
    within ``margin``; with figures per round, a mixed plan only where it beat the better uniform plan in every
    paired round), stored beside the others' median milliseconds as ``plan_ms``; ``batch_plans`` (``{batch: plans}``,
    :func:`measure_stage_plans` with ``batch``) does the same at each of its batch sizes (``plans`` is
    ``batch_plans={1: plans}``). Like latencies, a property of the machine that measured them, which is recorded
    beside them."""
    import platform
    folder = Path(folder)
    with bundle_lock(folder):
        manifest = read_manifest(folder)
        stages = 1 if manifest["kind"] == "static" else int(manifest.get("num_exits", 0))
        batches = {}
        for b, by_threads in sorted(measured.items()):
            cands = sorted(int(t) for t in by_threads)
            if not cands or any(len(by_threads[t]) != stages for t in by_threads):
                raise BundleError(f"bundle {folder}: expected {stages} stage times per thread count (a "
                                  f"{manifest['kind']} bundle), got {dict(by_threads)}")
            fastest = [min(float(by_threads[t][k]) for t in cands) for k in range(stages)]
            best = [next(t for t in cands if float(by_threads[t][k]) <= fastest[k] * (1 + margin))
                    for k in range(stages)]
            batches[str(int(b))] = {"threads": best,
                                    "stage_ms": {str(t): [float(v) for v in by_threads[t]] for t in cands}}
        tried = {int(t) for m in measured.values() for t in m}            # the candidates of the stage figures
        by_batch = {**({1: plans} if plans else {}), **{b: v for b, v in (batch_plans or {}).items() if v}}
        for b, found in by_batch.items():
            tried = tried or {int(t) for p in found for t in p}            # plans alone: their own counts
            figures = {p: [float(t) for t in v] if isinstance(v, (list, tuple)) else [float(v)]
                       for p, v in found.items()}
            if not _is_count(b) or any(len(p) != stages or any(int(t) not in tried for t in p) for p in found) or \
                    not all(v and all(t >= 0 and math.isfinite(t) for t in v) for v in figures.values()):
                raise BundleError(f"bundle {folder}: plans must give one measured thread count per stage ({stages}, "
                                  f"from {sorted(tried)}) and finite milliseconds, for a positive batch size; got "
                                  f"batch {b!r}: {dict(found)}")
            try:
                pick = pick_plan(found, margin)
            except DyncnnError as e:
                raise BundleError(f"bundle {folder}, batch {b}: {e}") from None
            entry = batches.setdefault(str(int(b)), {"stage_ms": {}})
            entry["threads"] = [int(t) for t in pick]
            entry["plan_ms"] = {_plan_key(p): float(np.median(v)) for p, v in figures.items()}
        manifest["stage_threads"] = {
            "candidates": sorted(tried), "batches": batches,
            "runtime": "onnxruntime",
            "machine": machine or f"{platform.machine()} {platform.processor() or ''}".strip()}
        write_manifest(folder, manifest)
    return manifest


def stage_threads_table(manifest: dict) -> dict[int, list[int]] | None:
    """``{batch size: [thread count per stage]}`` recorded in ``manifest`` (:func:`record_stage_threads`), or
    None when not measured."""
    entry = manifest.get("stage_threads")
    if not entry:
        return None
    return {int(b): [int(t) for t in e["threads"]] for b, e in entry["batches"].items()}
