"""Files written safely: adapters, reports and models are replaced whole or not at all,
and an output folder is checked and held by one run at a time."""

from __future__ import annotations

import errno
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable


# atomic_write's temporary names: mkstemp's ".<name>.<8 random characters>.tmp"
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def atomic_write(path, write: Callable[[str], None]) -> Path:
    """``write(tmp_name)`` into a temporary file beside ``path``, then rename it over
    ``path``: readers see the old file or the new one, never half of one, also after a
    crash (the data reach the disk before the rename). A failed write (a full disk:
    torch.save raises RuntimeError) is an OSError naming ``path``; ``path`` is untouched."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder")
    folder = next((p for p in path.parents if p.exists()), None)
    if folder is not None and not folder.is_dir():
        raise NotADirectoryError(f"cannot write {path}: {folder} is a file, not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        try:
            write(tmp)
            _sync(tmp)
        except (OSError, RuntimeError) as exc:
            raise OSError(f"cannot write {path}: {_why(exc)}") from exc
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the mode open() would give, not mkstemp's 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    try:  # the rename itself on disk (where the OS lets a folder be opened and synced)
        _sync(path.parent)
    except OSError:
        pass
    return path


def _why(exc: Exception) -> str:
    """A failed write's reason, with the full disk named where that is the cause:
    torch.save's RuntimeError then says only "unexpected pos" (other errors, say a model
    that cannot be serialised, are not blamed on the disk)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the disk"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())
    return reason + (" (disk full?)" if "unexpected pos" in reason else "")


def _sync(path) -> None:
    """``path``'s data (a file's, a folder's entries) flushed to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


MODEL_SUFFIXES = (".model", ".pth", ".pt")  # MACE's and SevenNet's model files (torch.save)


def names_a_file(spec: str) -> bool:
    """Whether a model given by the user (``--model``, ``--foundation_model``) is a path (a
    folder in it, or a model file's suffix), not a name that a package downloads."""
    return len(Path(spec).parts) > 1 or Path(spec).suffix in MODEL_SUFFIXES


def check_output_folder(path) -> Path:
    """``path`` where an output folder can be: not a file, nor below one. Nothing is made
    (a run checks this before its slow work, and makes the folder once it writes)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output folder {path} is a file")
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ValueError(f"output folder {path} cannot be made: {above} is a file")
    return path


def output_folder(path) -> Path:
    """``path`` as a writable folder (made if missing), or a one-line error saying why not."""
    path = check_output_folder(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"output folder {path} cannot be made: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {path} is not writable")
    return path


@contextmanager
def exclusive(folder: Path, made: bool = False):
    """Hold ``folder`` for this process while the block runs (a lock file in it): a second
    run on the same folder is refused at once instead of interleaving writes. Temporary
    files left by a killed writer (``atomic_write``'s) are removed once the lock is held.
    A block that fails before writing anything leaves no lock file behind, nor the folder
    where it was ``made`` for this run."""
    import fcntl

    lock = folder / ".lock"
    if lock.exists() and not lock.is_file():
        raise ValueError(f"output folder {folder}: {lock.name} is not a file (sparsekern's lock): remove it")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # (the holder's lock and folder are left as they are)
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise ValueError(f"output folder {folder} is in use by another run (pid {holder}); "
                             "wait for it to finish or choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        for stale in folder.glob(".*.tmp"):
            if _TEMPORARY.fullmatch(stale.name):  # atomic_write's names only, not the user's
                stale.unlink()
        try:
            yield
        except BaseException:
            if [p.name for p in folder.iterdir()] == [lock.name]:
                lock.unlink()
                if made:
                    folder.rmdir()
            raise
    finally:
        os.close(fd)
