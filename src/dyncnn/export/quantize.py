"""Post-training static INT8 quantization with ONNX Runtime's tooling (``onnxruntime.quantization``).

Each FP32 graph is first pre-processed (``quant_pre_process``: shape inference and graph optimisation, which
folds batch norms and fuses what it can), then quantized with ``quantize_static`` in the QDQ format: weights
int8 per output channel, activations uint8 (the U8S8 combination that ONNX Runtime's x86 kernels are fastest
at). Weights use the reduced 7-bit range [-64, 64] (``reduce_range=True``; activations keep all of uint8): on
x86 CPUs with AVX2 but no VNNI, ONNX Runtime's fused U8S8 kernels (QLinearConv, QGemm, QLinearMatMul) add pairs of
uint8 x int8 products in int16 (VPMADDUBSW), which saturates once 255*(|w1| + |w2|) > 32767. With 7-bit weights a
pair stays within 2*255*64 = 32640, so the fused INT8 graph computes what its QDQ form says on any x86 CPU. (With
8-bit weights a constant activation at 255 against weights near -127 gave logits 39% off on an AVX2-only CPU.)
Activation ranges come from the 99.999th percentile of each activation's histogram over the calibration data. Percentile
rather than MinMax calibration: on our small networks a few outlier activations stretch the MinMax ranges so much
that INT8 changed 29% of the top-1 decisions of a tiny MobileNet (random weights, batch-norm statistics from the
data) on ScaledMNIST, against 1% with percentiles. The calibration data are real images (the validation split),
fed through a :class:`FeedReader`.

For a multi-exit bundle every stage graph (stage + exit head) is quantized separately. Its calibration data are
the inputs each graph sees when the FP32 bundle runs the calibration images to full depth (so the last stages are
calibrated on the hard samples as well as the easy ones). The INT8 files go to ``int8/`` in the bundle and are
recorded in the manifest beside the FP32 ones; ``load_bundle(dir, precision="int8")`` runs them with the same
driver. The manifest's thresholds stay those of the FP32 model: re-calibrate them on the INT8 bundle if the
accuracy moves.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from torch import Tensor

from ..errors import DyncnnError


def _reader_base():
    from onnxruntime.quantization import CalibrationDataReader
    return CalibrationDataReader


class FeedReader(_reader_base()):
    """A ``CalibrationDataReader`` over a list of feed dicts (``{input name: array}``), rewindable."""

    def __init__(self, feeds: Sequence[dict]):
        self.feeds = list(feeds)
        self._it = iter(self.feeds)

    def get_next(self) -> dict | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds)


CALIBRATION = ("percentile", "minmax", "entropy")


def quantize_graph(src: str | os.PathLike, dst: str | os.PathLike, feeds: Sequence[dict], *,
                   per_channel: bool = True, preprocess: bool = True, calibration: str = "percentile") -> str:
    """INT8 static quantization of the ONNX file ``src`` into ``dst``, calibrated on ``feeds``
    (``calibration``: "percentile" (99.999th), "minmax" or "entropy"). Returns the calibration used: a
    histogram method falls back to MinMax on a graph with a constant activation (ONNX Runtime's histogram
    calibrators cannot bin a zero range)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    if not feeds:
        raise DyncnnError(f"no calibration data for {src}")
    if calibration not in CALIBRATION:
        raise DyncnnError(f"calibration must be one of {CALIBRATION}, got {calibration!r}")
    methods = {"percentile": CalibrationMethod.Percentile, "minmax": CalibrationMethod.MinMax,
               "entropy": CalibrationMethod.Entropy}
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        model_in = Path(src)
        if preprocess:
            model_in = Path(tmp) / "pre.onnx"
            quant_pre_process(str(src), str(model_in), skip_symbolic_shape=False)
        out = Path(tmp) / "q.onnx"
        for method in dict.fromkeys([calibration, "minmax"]):
            extra = {"CalibPercentile": 99.999} if method == "percentile" else {}
            try:
                with contextlib.redirect_stdout(io.StringIO()):    # the histogram calibrators print progress
                    quantize_static(str(model_in), str(out), FeedReader(feeds), quant_format=QuantFormat.QDQ,
                                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                    per_channel=per_channel, reduce_range=True, calibrate_method=methods[method],
                                    extra_options=extra)
                break
            except ValueError as e:                  # "Too many bins for data range": a constant activation
                if method == "minmax" or "bins" not in str(e):
                    raise
        os.replace(out, dst)
    return method


def _batches(images: Tensor | np.ndarray, batch_size: int) -> Iterable[np.ndarray]:
    arr = images.detach().cpu().float().numpy() if isinstance(images, Tensor) else np.asarray(images, np.float32)
    for i in range(0, len(arr), batch_size):
        yield np.ascontiguousarray(arr[i:i + batch_size])


def quantize_bundle(folder: str | os.PathLike, calibration: Tensor | np.ndarray, batch_size: int = 32) -> dict:
    """Add INT8 graphs to the bundle in ``folder``, calibrated on ``calibration`` images; returns the manifest."""
    from .bundle_format import file_record, write_manifest
    from .runtime import load_bundle
    folder = Path(folder)
    bundle = load_bundle(folder, "fp32")
    manifest = bundle.manifest
    if len(calibration) == 0:
        raise DyncnnError("quantization needs at least one calibration image")
    for x in _batches(calibration, batch_size):          # checks the images before any work
        bundle.check_input(x)
    if manifest["kind"] == "static":
        feeds = [{"input": x} for x in _batches(calibration, batch_size)]
        g = manifest["graph"]
        method = quantize_graph(folder / g["files"]["fp32"]["file"], folder / "int8" / "model.onnx", feeds)
        g["files"]["int8"] = {**file_record(folder, "int8/model.onnx"), "calibration": method}
    else:
        feeds: dict = {}
        for x in _batches(calibration, batch_size):
            bundle.exit_logits(x, feeds=feeds)
        for k, entry in enumerate(manifest["stages"]):
            if entry["files"]:
                name = f"int8/stage{k}.onnx"
                method = quantize_graph(folder / entry["files"]["fp32"]["file"], folder / name, feeds[k])
                entry["files"]["int8"] = {**file_record(folder, name), "calibration": method}
    manifest["int8"] = {"method": "onnxruntime.quantization.quantize_static", "format": "QDQ",
                        "activations": "uint8", "weights": "int8 per-channel, 7-bit range",
                        "calibration": "percentile 99.999 (minmax where a graph has a constant activation)",
                        "calibration_images": int(len(calibration))}
    write_manifest(folder, manifest)
    return manifest


def quantize_onnx_file(src: str | os.PathLike, dst: str | os.PathLike, calibration: Tensor | np.ndarray,
                       input_name: str = "input", batch_size: int = 32) -> Path:
    """INT8 copy of a single-input ONNX file (e.g. from :func:`export_onnx`), calibrated on images."""
    quantize_graph(src, dst, [{input_name: x} for x in _batches(calibration, batch_size)])
    return Path(dst)
