"""Atomic writes and small JSON/CSV helpers shared by every stage.

Every artefact is first written to a temporary file in the same folder and then renamed over the
target with ``os.replace``, so a crash never leaves a partial file where DVC or the next stage would
accept it. The temporary file is hidden and carries the writer's pid (``.NAME.PID.XXXX.tmp``); one left
by a killed process is removed by the next write of the same target.

A stage writes all its outputs inside :func:`replaced_together`: each atomic write then keeps its complete
temporary file, and they are all renamed into place, one after the other, only when the whole stage
succeeded; on any failure (an error, Ctrl-C) they are removed and the previous outputs stay as they were.

A stage reports a :class:`StageRecord`: its figures (metrics/NAME/STAGE.json, numbers only) and their provenance
(metrics/NAME/STAGE.provenance.json), written together by :func:`write_record`.

Every ``torch.load`` goes through :func:`safe_torch_load` (``weights_only=True``: nothing in a file is executed).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import pickle
import shutil
import stat
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fgpipe.errors import ArtifactError, FgpipeError, OutputError
from fgpipe.layout import MetricsDir


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


# errno values only a write raises: whatever runs inside atomic_path's block, they are about the file it writes
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
# {setting}: the params key(s) choosing the folder written to
_WRITE_HINTS = {
    errno.ENOSPC: "free some disk space",
    errno.EDQUOT: "free some space within your disk quota",
    errno.EFBIG: "write to a file system that allows larger files",
    errno.EROFS: "the file system is mounted read-only: make it writable, or point {setting} at a writable folder",
    errno.EACCES: "give this user write permission on that folder, or point {setting} at a writable folder",
}
OUTPUT_SETTING = "prepare.data_dir / prepare.metrics_dir"  # where every stage writes its outputs


def output_error(
    target: str | os.PathLike[str], exc: OSError, atomic: bool = True, setting: str = OUTPUT_SETTING
) -> OutputError:
    """The OutputError of a failed write of ``target``: the path, what the errno means and what to do (``atomic``:
    it was an :func:`atomic_path` write, so the message can say the previous file is intact; ``setting``: the
    params key that chooses the folder, e.g. ``datasets.NAME.root`` for a dataset being generated or downloaded)."""
    code = exc.errno if exc.errno is not None else 0
    name = errno.errorcode.get(code, "")
    meaning = os.strerror(code) if code else str(exc)
    hint = _WRITE_HINTS.get(errno.EACCES if code == errno.EPERM else code, "fix the cause").format(setting=setting)
    kept = f" Nothing was written in its place: the previous {Path(target).name}, if any, is unchanged" if atomic else ""
    return OutputError(f"cannot write {target}: {meaning}{f' ({name})' if name else ''}; {hint}, then rerun the command.{kept}")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it is renamed onto ``target`` (inside
    :func:`replaced_together`: kept complete and renamed with the rest of the set, at its end).

    On any exception the temporary file is removed and ``target`` is left untouched. A failure to write (a full
    disk, a read-only folder: an OSError while creating, syncing or renaming the file, or one of the write-only
    errnos from the block) becomes an :class:`OutputError` naming ``target``.
    """
    target = Path(target)
    outputs = _OUTPUTS.get()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise output_error(target, exc) from None
    tmp_path = Path(tmp)
    staged = False
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
            if outputs is None:
                os.replace(tmp_path, target)
        except OSError as exc:
            raise output_error(target, exc) from None
        if outputs is not None:
            outputs.stage(target, tmp_path)  # renamed when the whole set is committed
            staged = True
    finally:
        if not staged:
            tmp_path.unlink(missing_ok=True)


class OutputSet:
    """The outputs of one stage run, replaced together: see :func:`replaced_together`."""

    def __init__(self) -> None:
        self._staged: dict[Path, Path] = {}  # target -> its complete temporary file, in the order written
        self._moved: list[tuple[Path, Path]] = []  # (target, source): a finished file or folder renamed into place
        self._removed: list[Path] = []

    @staticmethod
    def _key(target: str | os.PathLike[str]) -> Path:
        return Path(os.path.abspath(target))

    def stage(self, target: str | os.PathLike[str], tmp: Path) -> None:
        """Keep ``tmp``, the complete new content of ``target``, until :meth:`commit` (a second write replaces it)."""
        key = self._key(target)
        earlier = self._staged.pop(key, None)
        if earlier is not None and earlier != tmp:
            earlier.unlink(missing_ok=True)
        self._staged[key] = tmp

    def pending(self, target: str | os.PathLike[str]) -> Path:
        """Where ``target``'s content from this run is now: its temporary file until the commit, else ``target``."""
        return self._staged.get(self._key(target), Path(target))

    def remove(self, target: str | os.PathLike[str]) -> None:
        """Delete ``target`` at the commit (an output this run no longer writes)."""
        self._removed.append(Path(target))

    def move(self, target: str | os.PathLike[str], source: str | os.PathLike[str]) -> None:
        """Rename ``source`` (a complete file or folder) onto ``target`` at the commit, after the staged files; a
        folder already at ``target`` is replaced whole. Discarded, ``source`` stays where it is."""
        self._moved.append((Path(target), Path(source)))

    def commit(self) -> None:
        """Rename every staged file onto its target, in the order written, then delete the files to remove."""
        for key, tmp in list(self._staged.items()):
            try:
                os.replace(tmp, key)
            except OSError as exc:
                raise output_error(key, exc) from None
            del self._staged[key]
        for target, source in self._moved:
            _rename_into_place(target, source)
        self._moved.clear()
        for path in self._removed:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise output_error(path, exc, atomic=False) from None
        self._removed.clear()

    def discard(self) -> None:
        """Delete every staged temporary file: the targets keep their previous content."""
        for tmp in self._staged.values():
            tmp.unlink(missing_ok=True)
        self._staged.clear()
        self._moved.clear()
        self._removed.clear()


def _rename_into_place(target: Path, source: Path) -> None:
    """``source`` renamed onto ``target``; a folder at ``target`` is first renamed aside, then deleted."""
    aside = None
    try:
        if source.is_dir() and target.is_dir():
            aside = target.with_name(f".{target.name}.{os.getpid()}.old")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(target, aside)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
    except OSError as exc:
        if aside is not None and aside.exists() and not target.exists():
            os.replace(aside, target)  # put the previous folder back
        raise output_error(target, exc, atomic=False) from None
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


_OUTPUTS: ContextVar[OutputSet | None] = ContextVar("fgpipe_outputs", default=None)


@contextlib.contextmanager
def replaced_together() -> Iterator[OutputSet]:
    """Collect every :func:`atomic_path` write (and :func:`remove_output`) of the block; rename them all into place
    when the block succeeds, delete them when it raises (any exception, KeyboardInterrupt too), so a stage's
    outputs change together or not at all. Read a file written in the block through :meth:`OutputSet.pending`.
    Inside another such block, the writes join the outer set."""
    outer = _OUTPUTS.get()
    if outer is not None:
        yield outer
        return
    outputs = OutputSet()
    token = _OUTPUTS.set(outputs)
    try:
        yield outputs
    except BaseException:
        _OUTPUTS.reset(token)
        outputs.discard()
        raise
    _OUTPUTS.reset(token)
    try:
        outputs.commit()
    finally:
        outputs.discard()  # whatever a failed commit left


def pending(target: str | os.PathLike[str]) -> Path:
    """Where ``target``'s content from this run is: inside :func:`replaced_together`, the temporary file written
    for it until the commit; else ``target`` itself."""
    outputs = _OUTPUTS.get()
    return outputs.pending(target) if outputs is not None else Path(target)


def remove_output(target: str | os.PathLike[str]) -> None:
    """Delete an output this run no longer writes: at the commit inside :func:`replaced_together`, else now."""
    outputs = _OUTPUTS.get()
    if outputs is not None:
        outputs.remove(target)
        return
    try:
        Path(target).unlink(missing_ok=True)
    except OSError as exc:
        raise output_error(target, exc, atomic=False) from None


def move_output(target: str | os.PathLike[str], source: str | os.PathLike[str]) -> None:
    """Rename ``source``, a complete file or folder, onto the output ``target`` (a folder there is replaced whole):
    at the commit inside :func:`replaced_together`, after its staged files; else now."""
    outputs = _OUTPUTS.get()
    if outputs is not None:
        outputs.move(target, source)
        return
    _rename_into_place(Path(target), Path(source))


def remove_folder(folder: str | os.PathLike[str]) -> None:
    """Delete ``folder`` and everything in it, if it exists (a training run's ``unfinished`` folder)."""
    try:
        shutil.rmtree(folder)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise output_error(folder, exc, atomic=False) from None


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


def non_figures(doc: Any, prefix: str = "") -> list[str]:
    """The dotted keys of ``doc`` (nested objects) whose value is not a figure: a number, a bool or None (a figure
    that does not apply); a list, a string or a path is not one."""
    if isinstance(doc, dict):
        return [k for key, value in doc.items() for k in non_figures(value, f"{prefix}{key}.")]
    return [] if doc is None or isinstance(doc, (bool, int, float)) else [prefix.rstrip(".") or "(the document)"]


def relative_paths(doc: Any, base: Path) -> Any:
    """``doc`` (plain JSON data) with every absolute path in it relative to ``base`` (the project root): a Path, or a
    string naming an absolute path (``~`` expanded), becomes the POSIX path from ``base`` to it (``..`` where it lies
    outside). A relative string stays as it is: params files and command-line options give paths relative to the
    params file's folder already."""
    if isinstance(doc, dict):
        return {key: relative_paths(value, base) for key, value in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [relative_paths(value, base) for value in doc]
    if isinstance(doc, Path) or (isinstance(doc, str) and os.path.isabs(os.path.expanduser(doc))):
        return _relative(Path(os.path.expanduser(doc)), base)
    return doc


def _relative(path: Path, base: Path) -> str:
    """The POSIX path from ``base`` to ``path``: lexical (a data/ folder linked to another disk stays data/...), or,
    where that leaves ``base`` but the resolved paths do not (the project reached through a link), the resolved one."""
    lexical = os.path.relpath(os.path.abspath(path), os.path.abspath(base))
    if lexical.split(os.sep, 1)[0] == os.pardir:
        resolved = os.path.relpath(os.path.realpath(path), os.path.realpath(base))
        if resolved.split(os.sep, 1)[0] != os.pardir:
            return Path(resolved).as_posix()
    return Path(lexical).as_posix()


@dataclass(frozen=True)
class StageRecord:
    """What one stage run reports, as two files side by side (README "The pipeline"):

    - ``metrics``: the figures a user compares across runs and experiments (metrics/NAME/STAGE.json, what `dvc
      metrics show` and `dvc exp show` read): numbers, in nested objects, None where one does not apply;
    - ``provenance``: how they were made (metrics/NAME/STAGE.provenance.json): the dataset, names, devices,
      options, the hashes of the inputs; paths relative to the project root (:func:`relative_paths`).

    A non-figure in ``metrics`` is a bug of the stage writing it: a TypeError."""

    metrics: dict[str, Any]
    provenance: dict[str, Any]

    def __post_init__(self) -> None:
        bad = non_figures(self.metrics)
        if bad:
            raise TypeError(f"metrics hold only figures (numbers, bools, None); not {', '.join(bad)}: put them in the provenance")


def write_record(metrics: MetricsDir, stage: str, record: StageRecord) -> None:
    """metrics/NAME/STAGE.json and STAGE.provenance.json, each atomically (inside :func:`replaced_together`, with
    the stage's other outputs)."""
    write_json(metrics.stage(stage), record.metrics)
    write_json(metrics.provenance(stage), record.provenance)


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def read_json_artifact(path: str | os.PathLike[str], fix: str) -> dict[str, Any]:
    """A JSON artefact a stage reads (data/NAME/dataset.json, metrics/NAME/evaluate.json, ...): a JSON object.

    Anything else raises one ArtifactError naming the file (and the line where the JSON breaks) followed by
    ``fix`` (``rerun `fgpipe evaluate --dataset NAME```): missing, a folder or another non-regular file (a FIFO
    is never opened), unreadable, not UTF-8, not JSON, NaN or Infinity (which Python's json would accept, but
    which JSON has not), or a value other than an object. The caller checks the keys it reads.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ArtifactError(f"{path} not found; {fix}") from None
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot be read ({exc.strerror or exc}); {fix}") from None
    if not stat.S_ISREG(mode):
        raise ArtifactError(f"{path}: not a regular file (a {_file_kind(mode)}); remove it and {fix}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot be read ({exc.strerror or exc}); {fix}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start}); {fix}") from None
    try:
        doc = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno}); {fix}") from None
    except ValueError as exc:  # NaN, Infinity, -Infinity
        raise ArtifactError(f"{path}: not valid JSON ({exc}); {fix}") from None
    if not isinstance(doc, dict):
        raise ArtifactError(f"{path}: expected a JSON object, got {type(doc).__name__}; {fix}")
    return doc


def _file_kind(mode: int) -> str:
    """What a non-regular file is, for a message."""
    kinds = ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))
    return next((name for test, name in kinds if test(mode)), "special file")


def check_output_paths(files: Iterable[str | os.PathLike[str]] = (), folders: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Refuse, before a stage's long work, outputs it could not write at its end: a file output that is a folder,
    a folder output that is a file, or a folder on the way to either that is a file (``data/NAME/stage1`` a file).

    Raises an OutputError naming the path in the way and what to do; permissions and free space are left to the
    write itself (:func:`atomic_path` names those)."""
    for target, want_dir in [*((Path(f), False) for f in files), *((Path(d), True) for d in folders)]:
        if os.path.lexists(target) and target.is_dir() != want_dir:
            what, should = ("folder", "file") if not want_dir else ("file", "folder")
            raise OutputError(
                f"cannot write {target}: it is a {what} where this stage writes a {should}; move it away, then rerun the command"
            )
        for parent in target.parents:
            if parent.is_dir():
                break
            if os.path.lexists(parent):
                raise OutputError(
                    f"cannot write {target}: {parent} is a file (or a broken link), not a folder; move it away, then "
                    "rerun the command"
                )


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


class FileHashes:
    """:func:`file_sha256` of each file read once per run (several checks name the same checkpoint)."""

    def __init__(self) -> None:
        self._seen: dict[Path, str] = {}

    def __call__(self, path: str | os.PathLike[str]) -> str:
        key = Path(os.path.abspath(path))
        if key not in self._seen:
            self._seen[key] = file_sha256(key)
        return self._seen[key]


# what torch.load(weights_only=True) raises on a damaged file besides UnpicklingError (found by fuzzing real
# checkpoints); UnpicklingError's own text tells the user to retry with weights_only=False, which fgpipe never
# says nor does
_TORCH_LOAD_ERRORS = (RuntimeError, EOFError, ValueError, KeyError, TypeError, AttributeError, IndexError, AssertionError)
# a damaged pickle header also warns about its protocol before the error fgpipe reports: filtered once, here (a
# filter set around each load would be process-wide anyway, and would reset Python's warn-once registry)
warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)


def safe_torch_load(
    path: str | os.PathLike[str], what: str, fix: str, *, key: str = "", error: type[FgpipeError] = ArtifactError,
    map_location: Any = "cpu",
) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain data only, nothing in the file is ever executed.

    A file that cannot be read raises ``error``: ``[KEY: ]PATH: not a readable WHAT (why); FIX``, where ``what``
    names what the file should be (``checkpoint``) and ``fix`` says what to do; ``key`` is the params key that named
    the file, if any (``model.weights``). torch's own advice to load it with ``weights_only=False`` is never passed on.
    """
    import torch  # here, not at the top: the rest of this module serves stages that never load a tensor

    path = Path(path)
    said = f"{key}: {path}" if key else str(path)
    try:
        if path.stat().st_size == 0:
            raise EOFError("the file is empty")
        return torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError as exc:
        raise error(f"{said}: cannot be read ({exc.strerror}): give this user read access to it") from None
    except pickle.UnpicklingError:
        raise error(
            f"{said}: not a readable {what} (damaged, or it holds Python objects besides tensors and plain data, "
            f"which fgpipe never unpickles); {fix}"
        ) from None
    except (*_TORCH_LOAD_ERRORS, OSError) as exc:
        detail = " ".join(str(exc).split(". ")[0].split())[:160] if "weights_only" not in str(exc) else ""
        raise error(f"{said}: not a readable {what} (truncated or damaged{': ' + detail if detail else ''}); {fix}") from None
