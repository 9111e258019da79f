import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("ddp_script.py")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_two_process_torchrun_equals_one_process(tmp_path):
    single, double = tmp_path / "single.safetensors", tmp_path / "ddp.safetensors"
    subprocess.run([sys.executable, str(SCRIPT), str(single)], check=True, env=_env(), timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
                    "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", str(SCRIPT), str(double)],
                   check=True, env=_env(), timeout=300, capture_output=True)
    a, b = load_file(str(single)), load_file(str(double))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    # both runs trained: the weights moved away from the common initialisation
    for k in (k for k in a if not k.startswith("init.")):
        assert (a[k] - a[f"init.{k}"]).abs().max() > 1e-3
