"""Run by tests/train/test_distributed.py, under torchrun (2 processes) or as a single process."""
import sys

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Subset

from dyncnn.data import MNISTDigits
from dyncnn.train import TrainConfig, Trainer


def main(out: str) -> None:
    torch.manual_seed(0)
    # No BatchNorm: per-process batch statistics would differ from one process's by design.
    model = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    init = {f"init.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    data = Subset(MNISTDigits("train"), range(192))
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.1, progress=False, seed=1)
    Trainer(model, data, None, cfg).fit()
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        save_file({**init, **{k: v.contiguous() for k, v in model.state_dict().items()}}, out)


if __name__ == "__main__":
    main(sys.argv[1])
