"""What the benchmarks that read a finished ``dyncnn frontier`` run share: the skip without ``--run`` (as in
``make bench``), the run's saved settings, as :class:`~dyncnn.frontier.runner.FrontierSettings` for its seed, and
its static networks' logits on a split (:func:`static_logits`)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dyncnn.data import ScaledMNIST
from dyncnn.frontier.runner import FrontierSettings, _slug, build_static, presets
from dyncnn.profile import count_macs
from dyncnn.train.checkpoint import load_checkpoint, read_checkpoint


def skipped(script: str, how: str = "give one with --run RUN_DIR") -> None:
    """Say that ``script`` skips: it needs a finished run, which ``make bench`` does not give."""
    print(f"{Path(script).name}: skipped: it reads a finished `dyncnn frontier` run (hours of training on a 2-core "
          f"CPU); {how}")


def finished_run(run: str | None, script: str, **settings) -> tuple[Path, dict, FrontierSettings] | None:
    """``(run folder, its frontier.json, its settings for the seed it ran, with ``settings`` on top)``; None, after
    saying why, without a run."""
    if run is None:
        skipped(script)
        return None
    folder = Path(run)
    saved = json.loads((folder / "frontier.json").read_text())
    st = saved["settings"]
    return folder, saved, FrontierSettings(preset=st["preset"], canvas=st["canvas"], clutter=st["clutter"],
                                           data_seed=st["data_seed"], seeds=(saved["seeds"][0]["seed"],),
                                           **settings)


def static_logits(seed_dir: Path, preset: str, split: str, repeats: int) -> tuple[dict, dict, torch.Tensor]:
    """Logits on ``split`` (``repeats`` renderings per digit) and MACs per image of every static model of ``preset``
    trained in ``seed_dir`` (a run's ``models/seed{S}``); the data settings (canvas, clutter, data seed) are read
    from the checkpoints. Returns ``(logits, macs, targets)``."""
    first = next(seed_dir.glob("*/last.safetensors"))
    data = read_checkpoint(first)[1]["data"]
    specs = presets(data["canvas"])[preset]["static"]
    ds = ScaledMNIST(split, canvas=data["canvas"], clutter=data["clutter"], seed=data["seed"], repeats=repeats)
    x = ds.images.float() / 255
    logits, macs = {}, {}
    with torch.inference_mode():
        for spec in specs:
            net = build_static(spec)
            load_checkpoint(seed_dir / _slug(spec["label"]) / "last.safetensors", net)
            net.eval()
            logits[spec["label"]] = torch.cat([net(x[i:i + 250]) for i in range(0, len(x), 250)]).clone()
            macs[spec["label"]] = count_macs(net, x[:1]).per_sample
    return logits, macs, torch.as_tensor(ds.targets)
