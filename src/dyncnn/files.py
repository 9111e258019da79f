"""Files dyncnn writes and reads: atomic writes (a temporary file in the same folder, flushed, then renamed, with the
mode a plain ``open()`` would give); bounded reads of untrusted files (a regular file, its size checked before it
is read) and bounded JSON (nesting depth, integer digits); the advisory lock that keeps two runs out of one output
folder; and the spec that names a model in what is written about it (checkpoints, thresholds, bundle manifests).
At the bottom of the layering: every package may use it."""
from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .errors import DyncnnError, LockedError

if TYPE_CHECKING:
    from torch import nn

MAX_JSON_BYTES = 64 << 20       # manifests, thresholds files, checkpoint headers: kilobytes in practice
MAX_JSON_DEPTH = 64             # what dyncnn writes nests about 6 deep
LOCK_NAME = ".dyncnn.lock"


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


def read_bounded(path: str | os.PathLike, limit: int, what: str, error: type[Exception] = DyncnnError) -> bytes:
    """The bytes of ``path``, an untrusted file: refused (``error``, naming ``what`` and the path) unless it is a
    regular file (not a device such as ``/dev/zero``, a FIFO or a folder) of at most ``limit`` bytes, checked on the
    opened file before anything is read; a file that grows while it is read is refused at ``limit + 1`` bytes."""
    try:      # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} {path} is not a regular file (a device, FIFO, socket or folder); refusing to read it")
        if st.st_size > limit:
            raise error(f"{what} {path} has {st.st_size} bytes, more than the {limit} a {what} may have; refusing to "
                        f"read it")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise error(f"{what} {path} grew past {limit} bytes while it was read; refusing it")
    return data


def _depth(value: object, limit: int) -> int:
    """Nesting depth of a parsed JSON value, counted level by level up to ``limit + 1`` (iterative: the value may
    be deep; containers only: a manifest of thousands of records is walked in a fraction of its parse time)."""
    level, deepest = ([value] if isinstance(value, (dict, list)) else []), 0
    while level and deepest <= limit:
        deepest += 1
        inner: list = []
        for c in level:
            inner += [x for x in (c.values() if isinstance(c, dict) else c) if isinstance(x, (dict, list))]
        level = inner
    return deepest


def parse_json(text: str | bytes, where: str, error: type[Exception] = DyncnnError,
               max_depth: int = MAX_JSON_DEPTH) -> object:
    """``json.loads(text)`` of untrusted JSON, every failure raised as ``error`` naming ``where``: invalid JSON,
    nesting deeper than ``max_depth`` (the parser's own RecursionError past about 1,000 levels), an integer of more
    digits than Python converts (4,300), text that is not UTF-8."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise error(f"{where}: the JSON nests deeper than Python can parse; expected at most {max_depth} "
                    f"levels") from None
    except json.JSONDecodeError as e:
        raise error(f"{where} is not valid JSON: {e}") from None
    except (ValueError, UnicodeDecodeError) as e:     # "Exceeds the limit (4300 digits) for integer string ..."
        raise error(f"{where}: unreadable JSON: {e}") from None
    if _depth(value, max_depth) > max_depth:
        raise error(f"{where}: the JSON nests more than {max_depth} levels deep; expected at most {max_depth}")
    return value


def read_json(path: str | os.PathLike, what: str, error: type[Exception] = DyncnnError,
              limit: int = MAX_JSON_BYTES) -> object:
    """An untrusted JSON file, read with :func:`read_bounded` and parsed with :func:`parse_json`."""
    return parse_json(read_bounded(path, limit, what, error), f"{what} {path}", error)


def _holder(path: Path) -> str:
    """The pid written in a lock file (which is untrusted as any file: read bounded)."""
    try:
        text = read_bounded(path, 64, "lock file").decode(errors="replace").strip()
    except (OSError, DyncnnError):
        text = ""
    return text.split()[0] if text else "unknown"


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, what: str = "this folder",
                lock_file: str | os.PathLike | None = None) -> Iterator[Path]:
    """Hold an exclusive advisory lock (``flock``) on ``folder`` (created if absent) while the block runs: a
    second writer gets :class:`LockedError` naming the holder's pid. The lock lives in ``folder/.dyncnn.lock``, or
    in ``lock_file`` where the folder itself is replaced by a rename (a bundle). The kernel drops the lock of a
    process that dies, so a stale lock file left by a killed run is simply taken over. The lock file is removed on
    release; a lock taken on a file that was meanwhile removed is retried on the new one."""
    try:
        import fcntl
    except ImportError:          # no flock (Windows): no lock, as before
        yield Path(folder)
        return
    path = Path(lock_file) if lock_file is not None else Path(folder) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)    # a planted link is refused
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(f"{what} {folder} is in use by another dyncnn process (pid {_holder(path)}, lock "
                              f"file {path}); wait for it to finish or choose another output") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)             # the holder removed the file as we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)      # while still locked: a waiter that opened it retries on a fresh file
        os.close(fd)


def model_spec(model: nn.Module) -> dict:
    """The name and config that rebuild ``model`` with ``create_model`` (empty for unregistered models)."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    return dict(getattr(model, "dyncnn_spec", {}) or {})
