"""Atomic writes and small JSON/CSV helpers shared by every stage.

Every artefact is first written to a temporary file in the same folder and then renamed over the
target with ``os.replace``, so a crash never leaves a partial file where DVC or the next stage would
accept it. The temporary file is hidden and carries the writer's pid (``.NAME.PID.XXXX.tmp``); one left
by a killed process is removed by the next write of the same target.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fgpipe.errors import OutputError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


# errno values only a write raises: whatever runs inside atomic_path's block, they are about the file it writes
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
_WRITE_HINTS = {
    errno.ENOSPC: "free some disk space",
    errno.EDQUOT: "free some space within your disk quota",
    errno.EFBIG: "write to a file system that allows larger files",
    errno.EROFS: "the file system is mounted read-only: make it writable, or point prepare.data_dir / "
    "prepare.metrics_dir at a writable folder",
    errno.EACCES: "give this user write permission on that folder, or point prepare.data_dir / prepare.metrics_dir "
    "at a writable folder",
}


def output_error(target: str | os.PathLike[str], exc: OSError, atomic: bool = True) -> OutputError:
    """The OutputError of a failed write of ``target``: the path, what the errno means and what to do (``atomic``:
    it was an :func:`atomic_path` write, so the message can say the previous file is intact)."""
    code = exc.errno if exc.errno is not None else 0
    name = errno.errorcode.get(code, "")
    meaning = os.strerror(code) if code else str(exc)
    hint = _WRITE_HINTS.get(errno.EACCES if code == errno.EPERM else code, "fix the cause")
    kept = f" Nothing was written in its place: the previous {Path(target).name}, if any, is unchanged" if atomic else ""
    return OutputError(f"cannot write {target}: {meaning}{f' ({name})' if name else ''}; {hint}, then rerun the command.{kept}")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it is renamed onto ``target``.

    On any exception the temporary file is removed and ``target`` is left untouched. A failure to write (a full
    disk, a read-only folder: an OSError while creating, syncing or renaming the file, or one of the write-only
    errnos from the block) becomes an :class:`OutputError` naming ``target``.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise output_error(target, exc) from None
    tmp_path = Path(tmp)
    try:
        try:
            os.close(fd)
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        except OSError as exc:
            raise output_error(target, exc) from None
        try:
            yield tmp_path
        except OSError as exc:
            if exc.errno in _WRITE_ERRNOS:
                raise output_error(target, exc) from None
            raise
        try:
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp_path, target)
        except OSError as exc:
            raise output_error(target, exc) from None
    finally:
        tmp_path.unlink(missing_ok=True)


def remove_stale_temps(target: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files of ``target`` whose writer is gone (a killed run); return them."""
    target = Path(target)
    removed = []
    for tmp in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        pid = tmp.name[len(target.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def write_text(target: str | os.PathLike[str], text: str) -> None:
    """Atomically write a text file."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | os.PathLike[str], obj: Any) -> None:
    """Atomically write ``obj`` as indented, key-sorted JSON."""
    write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (used to tie artefacts to the inputs they came from)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
