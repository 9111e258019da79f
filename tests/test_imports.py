"""``import dyncnn`` stays light: the trainer and the distributed launcher load only when asked for."""
import json
import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _modules_after(code: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         env=env, capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_import_dyncnn_does_not_load_the_trainer_or_ddp():
    loaded = _modules_after("import dyncnn, dyncnn.models, dyncnn.dynamic")
    assert "dyncnn.models.blockdrop" in loaded          # every family is registered...
    # torch itself already imports torch.distributed (and DDP), so what we check is our own training modules
    heavy = {"dyncnn.train.trainer", "dyncnn.train.distributed", "dyncnn.train.recipes"}
    assert not heavy & loaded                           # ...without the training machinery


def test_train_package_api_still_resolves():
    loaded = _modules_after("from dyncnn.train import Trainer, TrainConfig, evaluate, save_checkpoint\n"
                            "import dyncnn.train as t; assert t.Trainer.__name__ == 'Trainer'")
    assert "dyncnn.train.trainer" in loaded
