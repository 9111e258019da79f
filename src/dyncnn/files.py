"""Files dyncnn writes: atomic writes (a temporary file in the same folder, flushed, then renamed, with the mode a
plain ``open()`` would give) and the spec that names a model in what is written about it (checkpoints, thresholds,
bundle manifests). At the bottom of the layering: every package may use it."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from torch import nn


def _umask() -> int:
    try:        # Linux: read it without the set-and-restore below, which is not thread-safe
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, folder: bool = False) -> None:
    """Give ``path`` the mode a plain ``open()`` / ``mkdir`` would (0666 / 0777 less the umask): ``tempfile``
    creates its files 0600 and folders 0700, which the rename would otherwise carry into the result."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def model_spec(model: nn.Module) -> dict:
    """The name and config that rebuild ``model`` with ``create_model`` (empty for unregistered models)."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    return dict(getattr(model, "dyncnn_spec", {}) or {})
