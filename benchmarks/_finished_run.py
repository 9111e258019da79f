"""What the benchmarks that read a finished ``dyncnn frontier`` run share: the skip without ``--run`` (as in
``make bench``) and the run's saved settings, as :class:`~dyncnn.frontier.runner.FrontierSettings` for its seed."""
from __future__ import annotations

import json
from pathlib import Path

from dyncnn.frontier.runner import FrontierSettings


def finished_run(run: str | None, script: str, **settings) -> tuple[Path, dict, FrontierSettings] | None:
    """``(run folder, its frontier.json, its settings for the seed it ran, with ``settings`` on top)``; None, after
    saying why, without a run."""
    if run is None:
        print(f"{Path(script).name}: skipped: it reads a finished `dyncnn frontier` run (hours of training on a "
              f"2-core CPU); give one with --run RUN_DIR")
        return None
    folder = Path(run)
    saved = json.loads((folder / "frontier.json").read_text())
    st = saved["settings"]
    return folder, saved, FrontierSettings(preset=st["preset"], canvas=st["canvas"], clutter=st["clutter"],
                                           data_seed=st["data_seed"], seeds=(saved["seeds"][0]["seed"],),
                                           **settings)
