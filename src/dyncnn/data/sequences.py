"""Sequence views of the embedded data, for recurrent models (e.g. the skipping RNNs of ``models/skiprnn.py``).

``RowSequenceDigits`` reads each 28x28 digit row by row: a sequence of 28 steps of 28 features. The blank rows at
the top and bottom of a digit and the slowly changing rows in between are the steps a skipping RNN learns not to
read.
"""
from __future__ import annotations

from torch import Tensor
from torch.utils.data import Dataset

from .mnist import MNISTDigits
from .stored import StoredImages


class RowSequenceDigits(StoredImages):
    """The embedded MNIST digits of one split as float sequences of shape (28, 28): (steps, features) in [0, 1].

    ``in_chans`` (1) and ``input_size`` (28) follow the other datasets so that the CLI can build a model for it;
    ``seq_len`` and ``feature_size`` describe the sequence.
    """

    num_classes = 10
    in_chans = 1

    def __init__(self, split: str = "train", seed: int = 0):
        digits = MNISTDigits(split, seed=seed)
        self.split, self.seed = split, seed
        self.images = digits.images[:, 0]          # (N, 28, 28) uint8: row t is step t
        self.targets = digits.targets
        self.input_size = self.seq_len = self.feature_size = 28


class ClipFeatureSequences(Dataset):
    """Clips of ``data.video.MovingDigits`` as sequences of per-frame features: each frame average-pooled by
    ``pool`` (64x64 -> 16x16 by default) and flattened, shape (frames, (canvas / pool)^2), float in [0, 1].

    A fixed, parameter-free feature extractor: a skipping RNN over these sequences decides which frames to fold
    into its state. ``video_kwargs`` go to ``MovingDigits`` (frames, canvas, noise, ...).
    """

    num_classes = 10
    in_chans = 1

    def __init__(self, split: str = "train", seed: int = 0, pool: int = 4, **video_kwargs):
        import torch.nn.functional as F

        from .video import MovingDigits
        clips = MovingDigits(split, seed=seed, **video_kwargs)
        canvas = clips.input_size
        if pool < 1 or canvas % pool:
            raise ValueError(f"pool must be a positive divisor of the canvas side {canvas}, got {pool}")
        self.split, self.seed, self.pool = split, seed, pool
        self.targets, self.informative = clips.targets, clips.informative
        n, t = clips.clips.shape[:2]
        feats = F.avg_pool2d(clips.clips.view(n * t, 1, canvas, canvas).float().div_(255), pool)
        self.features = feats.view(n, t, -1)
        self.seq_len, self.feature_size = t, self.features.shape[2]
        self.input_size = self.feature_size

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.features[i], int(self.targets[i])
