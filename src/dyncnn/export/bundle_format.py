"""The bundle format (``dyncnn-bundle-1``), in the one module that the writers (:mod:`.staged`, :mod:`.glance`,
:mod:`.quantize`) and the loaders (:mod:`.runtime`, :mod:`.glance`, :mod:`.bench`) import: the manifest (read with a
size limit, validated, written atomically), the file records (name, SHA-256, size) and the checks a graph file and
a loaded graph must pass, the size limits, and the writing of a bundle folder (a temporary folder beside the
output, renamed into place under an advisory lock; stale staging folders of a killed export are removed).

A bundle is untrusted input like any file: everything :func:`read_manifest` returns has passed
:func:`validate_manifest` (the content its kind needs, within the limits below, consistent with itself), and the
loaders compare every graph's declared inputs and outputs with what the manifest says flows between the stages
(:func:`check_graph_shapes`), so that a graph swapped for another stage's is refused at load, naming the stage.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from ..dynamic.policy import ExitPolicy
from ..errors import DyncnnError
from ..files import apply_umask, atomic_write_text, model_spec, output_lock, read_json
from .onnx import ExportError

FORMAT = "dyncnn-bundle-1"
MANIFEST = "manifest.json"
RUNTIMES = ("onnxruntime", "executorch")
GRAPH_SUFFIX = {"onnxruntime": ".onnx", "executorch": ".pte"}
KINDS = ("static", "multi_exit", "glance")

MAX_MANIFEST_BYTES = 16 << 20   # a manifest is kilobytes; a bigger one (or /dev/zero) is refused before reading
MAX_GRAPH_BYTES = 1 << 32       # 4 GiB: ONNX protobufs cannot be larger without external data
MAX_EXITS = 256                 # published multi-exit networks have up to ~10 exits
MAX_LEAVES = 1024               # tensors and constants in one stage's state
MAX_MACS = 10 ** 15             # per sample, cumulative: ~10,000x the largest published CNNs' cost per image
MAX_THREADS = 1024              # intra-op threads of one session: more than any CPU this runs on has cores
MAX_BATCH = 1 << 20             # the batch sizes a thread table is recorded for
THREADS_PER_STAGE = "per-stage"  # the drivers' ``threads`` value that runs each stage with its recorded count


class BundleError(DyncnnError):
    """A bundle folder that is missing, of another format version, or whose files do not match its manifest."""


# -- file records ---------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_record(folder: Path, name: str) -> dict:
    """``{"file", "sha256", "bytes"}`` of ``folder/name``: what the runtime checks before loading it."""
    p = folder / name
    return {"file": name, "sha256": sha256_file(p), "bytes": p.stat().st_size}


def graph_io(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """The input (without initializers) and output names of the ONNX graph in ``path``."""
    import onnx
    g = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    return [i.name for i in g.input if i.name not in inits], [o.name for o in g.output]


def bundle_file(folder: Path, rec: object, what: str, verify: bool) -> Path:
    """The graph file that manifest record ``rec`` names, after the checks that keep a crafted manifest inside
    the bundle: a relative name without ``..`` (``stage0.onnx``, ``int8/stage0.onnx``), not absolute, of a
    regular file inside ``folder`` (not a device, FIFO or a link out of the folder) of at most
    :data:`MAX_GRAPH_BYTES`; with ``verify``, of the recorded size (checked before it is hashed) and SHA-256."""
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
    if not os.path.isfile(path):
        raise BundleError(f"bundle {folder}: {what} file {name} is not a regular file")
    if st.st_size > MAX_GRAPH_BYTES:
        raise BundleError(f"bundle {folder}: {what} file {name} has {st.st_size} bytes, more than the "
                          f"{MAX_GRAPH_BYTES} a graph may have; refusing it")
    if verify:
        expected = rec.get("bytes")
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


def check_graph_shapes(folder: Path, sess, what: str, expected: Mapping[str, Sequence[int]],
                       num_classes: int | None = None, logits_name: str = "logits") -> None:
    """Refuse a graph whose declared per-sample shapes disagree with the manifest: ``expected`` maps input and
    output names to the shape after the batch axis (the image for stage 0, the state's leaves between stages),
    ``num_classes`` the logits' width. ONNX Runtime would otherwise fail with INVALID_ARGUMENT at the first call
    that reaches the graph (a stage file swapped for another stage's), or numpy would broadcast wrong logits."""
    if not hasattr(sess, "get_inputs"):     # an ExecuTorch program: its method checks the shapes it is given
        return
    inputs = {i.name: i.shape for i in sess.get_inputs()}
    dims = {**inputs, **{o.name: o.shape for o in sess.get_outputs()}}
    for name, want in expected.items():
        if name not in dims:
            continue
        got = list(dims[name])[1:]
        if len(got) != len(want) or any(isinstance(g, int) and g != e for g, e in zip(got, want)):
            verb = "takes inputs" if name in inputs else f"outputs {name}"
            raise BundleError(f"bundle {folder}: {what} {verb} of shape (N, {', '.join(map(str, got))}) ({name}); "
                              f"the manifest says (N, {', '.join(map(str, want))}): a graph of another stage or "
                              f"export")
    if num_classes is not None and logits_name in dims:
        got = list(dims[logits_name])
        if len(got) != 2 or (isinstance(got[1], int) and got[1] != num_classes):
            raise BundleError(f"bundle {folder}: {what} outputs logits of shape {got}; the manifest says "
                              f"{num_classes} classes")


# -- the manifest ---------------------------------------------------------------------------------------------
def read_manifest(folder: Path) -> dict:
    """The validated manifest of the bundle in ``folder`` (read with a size limit: a manifest that is a link to
    ``/dev/zero`` or a huge file is refused before it is read)."""
    if not folder.is_dir():
        raise BundleError(f"bundle {folder} does not exist or is not a folder (write one with `dyncnn export`)")
    path = folder / MANIFEST
    if not path.exists() and not path.is_symlink():
        raise BundleError(f"bundle {folder} has no {MANIFEST}: not a dyncnn bundle, or an export that did not "
                          f"finish (write one with `dyncnn export`)")
    manifest = read_json(path, "bundle manifest", BundleError, MAX_MANIFEST_BYTES)
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != FORMAT:
        raise BundleError(f"{path} has format {fmt!r}; this dyncnn reads {FORMAT!r} (re-export the model with "
                          f"this version)")
    if manifest.get("kind") not in KINDS:
        raise BundleError(f"{path}: unknown bundle kind {manifest.get('kind')!r}")
    validate_manifest(manifest, str(path))
    return manifest


def is_bundle_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a dyncnn bundle: a manifest that says so (a folder that merely has some
    ``manifest.json`` is someone else's, and is never replaced)."""
    try:
        manifest = read_json(folder / MANIFEST, "bundle manifest", BundleError, MAX_MANIFEST_BYTES)
    except (OSError, DyncnnError):
        return False
    return isinstance(manifest, dict) and str(manifest.get("format", "")).startswith("dyncnn-bundle-")


def write_manifest(folder: str | os.PathLike, manifest: dict) -> None:
    """Write ``manifest`` into ``folder`` atomically, after the checks the loader makes (:func:`validate_manifest`):
    a writer cannot leave a manifest that :func:`read_manifest` would refuse."""
    import json
    path = Path(folder) / MANIFEST
    if manifest.get("format") != FORMAT or manifest.get("kind") not in KINDS:
        raise BundleError(f"{path}: refusing to write a manifest of format {manifest.get('format')!r} and kind "
                          f"{manifest.get('kind')!r}; expected {FORMAT!r} and one of {KINDS}")
    validate_manifest(manifest, str(path))
    atomic_write_text(path, json.dumps(manifest, indent=2, allow_nan=True) + "\n")


# What each kind of bundle must hold (beyond format and kind), checked before anything is read.
_KIND_KEYS = {"static": ("graph",), "multi_exit": ("num_exits", "stages", "exit_macs", "policy"),
              "glance": ("num_exits", "graphs", "exit_macs", "policy", "patch_size", "policy_dim", "hidden_dim")}


def _positive_int(value, what: str, where: str, limit: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BundleError(f"{where}: {what} must be a positive integer, got {value!r:.80}")
    if limit is not None and value > limit:
        raise BundleError(f"{where}: {what} is {value}; at most {limit} are supported (a crafted or damaged "
                          f"manifest)")
    return value


def _macs_list(values: object, k: int, what: str, where: str) -> list[int]:
    if not isinstance(values, list) or len(values) != k or \
            any(isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= MAX_MACS for m in values):
        raise BundleError(f"{where}: {what} must list {k} non-negative integers of at most {MAX_MACS:.0e} (MACs "
                          f"per sample), got {values!r:.120}")
    return values


def validate_manifest(manifest: dict, where: str = "manifest") -> None:
    """The checks that a manifest (untrusted input, like any file) must pass before the driver uses it, with the
    rules of the Python API: the content its ``kind`` needs; the input shape and class count positive integers;
    at most :data:`MAX_EXITS` exits, per exit a stage and a cumulative MAC count that does not decrease, stays
    below :data:`MAX_MACS` and adds up the stages' own costs; stage records of the right shape whose states chain
    (what stage ``k`` outputs is what stage ``k + 1`` takes); an exit policy with one threshold per exit but the
    last (or one per exit) and its temperatures (none, or finite positive ones)."""
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
        _positive_int(v, what, where, 1 << 16)
    _positive_int(manifest.get("num_classes"), "num_classes", where, 1 << 24)
    if kind == "static":
        if not isinstance(manifest["graph"], dict):
            raise BundleError(f"{where}: graph must be an object, got {type(manifest['graph']).__name__}")
        _validate_stage_threads(manifest.get("stage_threads"), 1, where)
        return
    k = _positive_int(manifest["num_exits"], "num_exits", where, MAX_EXITS)
    listed = manifest["graphs"] if kind == "glance" else manifest["stages"]
    if kind == "multi_exit" and (not isinstance(listed, list) or len(listed) != k):
        raise BundleError(f"{where}: expected {k} stages (one per exit), got "
                          f"{len(listed) if isinstance(listed, list) else type(listed).__name__}")
    if kind == "glance" and not isinstance(listed, dict):
        raise BundleError(f"{where}: graphs must be an object, got {type(listed).__name__}")
    macs = _macs_list(manifest["exit_macs"], k, "exit_macs", where)
    if any(b < a for a, b in zip(macs, macs[1:])):
        raise BundleError(f"{where}: exit_macs must not decrease (they are cumulative), got {macs}")
    if kind == "multi_exit":
        _validate_stages(listed, where)
        own = [st["stage_macs"] + st["head_macs"] for st in listed]
    else:
        own = _macs_list(manifest.get("step_macs"), k, "step_macs", where)
    total = [sum(own[:i + 1]) for i in range(k)]
    if total != macs:
        raise BundleError(f"{where}: exit_macs {macs} are not the running sum of the stages' own costs {own} "
                          f"(a damaged or edited manifest)")
    _validate_policy(manifest["policy"], k, where)
    _validate_stage_threads(manifest.get("stage_threads"), k, where)


def _validate_stage_threads(table: object, stages: int, where: str) -> None:
    """The optional per-stage thread table (:func:`dyncnn.export.runtime.record_stage_threads`): the thread counts
    tried (``candidates``), and per batch size measured (``batches``, keyed by the size as a string) the count that
    ran each of the ``stages`` stages fastest (``threads``) and each candidate's milliseconds per call
    (``stage_ms``); optionally every measured plan's milliseconds per image at that batch size (``plan_ms``, keyed
    "1-2-2": :func:`dyncnn.export.runtime.measure_stage_plans`)."""
    if table is None:
        return
    here = f"{where}: stage_threads"
    if not isinstance(table, dict):
        raise BundleError(f"{here} must be an object, got {type(table).__name__}")
    cands = table.get("candidates")
    if not isinstance(cands, list) or not cands or \
            any(isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= MAX_THREADS for t in cands):
        raise BundleError(f"{here}: candidates must list thread counts in [1, {MAX_THREADS}], got {cands!r:.80}")
    batches = table.get("batches")
    if not isinstance(batches, dict) or not batches:
        raise BundleError(f"{here}: batches must be a non-empty object keyed by batch size, got {batches!r:.80}")
    for b, entry in batches.items():
        if not (isinstance(b, str) and b.isdecimal() and 1 <= int(b) <= MAX_BATCH and str(int(b)) == b):
            raise BundleError(f"{here}: batch size {b!r:.40} must be a positive integer (as a string) of at most "
                              f"{MAX_BATCH}")
        threads = entry.get("threads") if isinstance(entry, dict) else None
        if not isinstance(threads, list) or len(threads) != stages or \
                any(isinstance(t, bool) or not isinstance(t, int) or t not in cands for t in threads):
            raise BundleError(f"{here}: batch {b}: threads must list {stages} thread counts (one per stage), each "
                              f"one of the candidates {cands}, got {threads!r:.80}")
        ms = entry.get("stage_ms", {})
        if not isinstance(ms, dict) or any(
                t not in {str(c) for c in cands} or not isinstance(v, list) or len(v) != stages or
                any(isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x < float("inf") for x in v)
                for t, v in ms.items()):
            raise BundleError(f"{here}: batch {b}: stage_ms must map candidate thread counts to {stages} non-negative "
                              f"finite milliseconds, got {ms!r:.120}")
        plan_ms = entry.get("plan_ms", {})
        if not isinstance(plan_ms, dict) or any(
                not isinstance(k, str) or len(k.split("-")) != stages or
                any(t not in {str(c) for c in cands} for t in k.split("-")) or
                isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf")
                for k, v in plan_ms.items()):
            raise BundleError(f"{here}: batch {b}: plan_ms must map plans ({stages} candidate counts joined by '-', "
                              f"e.g. '1-2') to non-negative finite milliseconds, got {plan_ms!r:.120}")


def _validate_policy(p: object, k: int, where: str) -> None:
    if not isinstance(p, dict):
        raise BundleError(f"{where}: policy must be an object, got {type(p).__name__}")
    if "temperatures" not in p:
        raise BundleError(f"{where}: the exit policy lacks temperatures (its thresholds hold for the confidences "
                          f"at those temperatures); expected a list, [] for none")
    try:
        policy = ExitPolicy(p.get("thresholds"), p.get("criterion", "max_prob"), p["temperatures"])
    except DyncnnError as e:
        raise BundleError(f"{where}: invalid exit policy: {e}") from None
    if len(policy.thresholds) not in (k - 1, k):
        raise BundleError(f"{where}: the exit policy has {len(policy.thresholds)} thresholds; expected {k - 1} "
                          f"(one per exit but the last)")
    if len(policy.temperatures) not in (0, k - 1, k):
        raise BundleError(f"{where}: the exit policy has {len(policy.temperatures)} temperatures; expected none "
                          f"or one per exit ({k})")


def _leaves(state: object, what: str, where: str) -> list[dict]:
    leaves = state.get("leaves") if isinstance(state, dict) else None
    if not isinstance(leaves, list) or len(leaves) > MAX_LEAVES or not all(isinstance(r, dict) for r in leaves):
        raise BundleError(f"{where}: {what} must hold a list of at most {MAX_LEAVES} leaf records, got "
                          f"{leaves!r:.80}")
    for j, r in enumerate(leaves):
        if r.get("kind") == "tensor":
            s = r.get("shape")
            if not isinstance(s, list) or len(s) > 8 or \
                    any(isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 1 << 24 for d in s):
                raise BundleError(f"{where}: {what} leaf {j} has shape {s!r:.80}; expected the per-sample sizes")
        elif r.get("kind") != "const":
            raise BundleError(f"{where}: {what} leaf {j} is of kind {r.get('kind')!r:.40}; expected tensor or const")
    return leaves


def _indices(values: object, n: int, what: str, where: str) -> list[int]:
    if not isinstance(values, list) or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n
                                           for v in values):
        raise BundleError(f"{where}: {what} must list leaf indices below {n}, got {values!r:.80}")
    return values


def leaf_shapes(leaves: list[dict]) -> list[tuple | None]:
    """Per leaf, ``(kind, per-sample shape)`` of a tensor or ``None`` of a constant: what must chain."""
    return [("tensor", tuple(r["shape"])) if r["kind"] == "tensor" else None for r in leaves]


def _validate_stages(stages: list, where: str) -> None:
    """Every stage record of a multi-exit manifest: its costs, files, the leaves it takes and gives and where its
    logits come from; and the chain: stage ``k + 1`` takes what stage ``k`` gives (stage 0's input, the image, is
    compared with its graph at load)."""
    prev = None
    for k, st in enumerate(stages):
        here = f"{where}: stage {k}"
        if not isinstance(st, dict):
            raise BundleError(f"{here} must be an object, got {type(st).__name__}")
        for key in ("stage_macs", "head_macs"):
            v = st.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_MACS:
                raise BundleError(f"{here}: {key} must be an integer in [0, {MAX_MACS:.0e}], got {v!r:.40}")
        if not isinstance(st.get("files"), dict):
            raise BundleError(f"{here}: files must be an object, got {type(st.get('files')).__name__}")
        ins = _leaves(st.get("state_in"), "state_in", here)
        outs = _leaves(st.get("state_out"), "state_out", here)
        if prev is not None and leaf_shapes(ins) != prev:
            raise BundleError(f"{here} takes a state of {leaf_shapes(ins)}, but stage {k - 1} gives {prev}")
        _indices(st.get("inputs"), len(ins), "inputs", here)
        _indices(st.get("outputs"), len(outs), "outputs", here)
        for j, r in enumerate(outs):
            if r.get("source") == "input":
                _indices([r.get("index")], len(ins), f"state_out leaf {j}'s index", here)
            elif r["kind"] == "tensor" and r.get("source") != "graph":
                raise BundleError(f"{here}: state_out leaf {j} comes from {r.get('source')!r:.40}; expected the "
                                  f"graph or an input leaf")
        logits = st.get("logits")
        src = logits.get("source") if isinstance(logits, dict) else None
        if src == "leaf":
            _indices([logits.get("index")], len(outs), "logits index", here)
        elif src != "graph":
            raise BundleError(f"{here}: logits come from {src!r:.40}; expected the graph or a state leaf")
        prev = leaf_shapes(outs)


def stage_io_shapes(stage: dict) -> dict[str, tuple]:
    """The per-sample shape of each graph input ``in{i}`` and output ``out{j}`` of a (validated) stage record."""
    ins, outs = stage["state_in"]["leaves"], stage["state_out"]["leaves"]
    shapes = {f"in{i}": tuple(ins[i]["shape"]) for i in stage["inputs"] if ins[i]["kind"] == "tensor"}
    shapes.update({f"out{j}": tuple(outs[j]["shape"]) for j in stage["outputs"] if outs[j]["kind"] == "tensor"})
    return shapes


# -- writing a bundle folder ----------------------------------------------------------------------------------
def base_manifest(model, kind: str, input_shape: Sequence[int], opset: int, runtime: str = "onnxruntime") -> dict:
    """The manifest's header: format, kind, runtime, the model's spec, input, opset and the exporter's versions."""
    import torch
    manifest = {"format": FORMAT, "kind": kind, "runtime": runtime, "model": model_spec(model),
                "model_class": type(model).__name__, "num_classes": int(getattr(model, "num_classes", 0) or 0),
                "input": {"name": "input", "shape": ["batch", *map(int, input_shape)], "dtype": "float32"},
                "opset": opset, "exporter": "torchscript", "torch_version": torch.__version__}
    if runtime == "executorch":
        from .executorch import version
        manifest.update(exporter="torch.export + XNNPACK partitioner", executorch_version=version())
    return manifest


def bundle_lock(out_dir: Path):
    """The advisory lock of the bundle folder ``out_dir``. Its file lies beside the folder (``.NAME.lock``), not
    in it: the folder is replaced by a rename, which would carry a lock file inside it away."""
    return output_lock(out_dir, "bundle folder", lock_file=out_dir.parent / f".{out_dir.name}.lock")


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Remove what a killed export into ``out_dir`` left beside it: its staging folders (``.NAME.XXXXXXXX.tmp``,
    see :func:`writing_bundle`) and a replaced bundle not yet deleted (``.NAME.old-PID``). Call it holding
    :func:`bundle_lock` (no other export into ``out_dir`` can be running). Returns what was removed."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.([a-z0-9_]{{8}}\.tmp|old-\d+)")
    removed = []
    if out_dir.parent.is_dir():
        for p in out_dir.parent.iterdir():
            if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _prepare_out_dir(out_dir: Path) -> Path:
    """A fresh temporary folder beside ``out_dir``; refuses an ``out_dir`` holding something other than a bundle."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ExportError(f"--out {out_dir} exists and is not a folder")
        if any(out_dir.iterdir()) and not is_bundle_folder(out_dir):
            raise ExportError(f"--out {out_dir} is a non-empty folder without a dyncnn bundle (no {MANIFEST} of "
                              f"format {FORMAT!r}); refusing to replace it (choose a new or empty folder)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    apply_umask(tmp, folder=True)
    return tmp


def _commit(tmp: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` (empty, absent, or an older bundle) by the finished bundle in ``tmp``."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


@contextlib.contextmanager
def writing_bundle(out_dir: Path, model) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir`` with ``model`` in eval mode, holding :func:`bundle_lock` (a
    second export into ``out_dir`` meanwhile gets a LockedError naming this pid) after removing the staging
    folders of an earlier, killed export; on success the folder replaces ``out_dir`` (see :func:`_commit`), on
    failure it is removed; the model's mode is restored either way."""
    out_dir = Path(out_dir)
    was_training = model.training
    with bundle_lock(out_dir):
        remove_stale_staging(out_dir)
        model.eval()
        tmp = _prepare_out_dir(out_dir)
        try:
            yield tmp
            _commit(tmp, out_dir)
        finally:
            model.train(was_training)
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


# -- bundle writers of their own ------------------------------------------------------------------------------
_WRITERS: dict[type, Callable] = {}


def register_writer(cls: type) -> Callable[[Callable], Callable]:
    """Register the decorated ``writer(model, out_dir, *, policy, check_inputs, input_size) -> manifest`` for the
    bundles of model class ``cls`` (and its subclasses): a family whose bundle needs graphs and a driver of its own
    (GFNet's patch crops between graphs) instead of the staged one (see :func:`dyncnn.export.staged.own_writer`)."""
    def deco(fn: Callable) -> Callable:
        if cls in _WRITERS and _WRITERS[cls] is not fn:
            raise ValueError(f"{cls.__name__} already has a bundle writer ({_WRITERS[cls].__name__})")
        _WRITERS[cls] = fn
        return fn
    return deco


def registered_writer(model) -> Callable | None:
    """The writer registered for ``model``'s class or a base class, None if none (the registering modules must
    have been imported)."""
    for cls in type(model).__mro__:
        if cls in _WRITERS:
            return _WRITERS[cls]
    return None
