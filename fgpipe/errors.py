"""One error family: every message names the file, line or params key at fault and what is allowed."""

from __future__ import annotations


class FgpipeError(Exception):
    """Base of every error fgpipe reports to the user (the CLI prints it and exits 1)."""


class ConfigError(FgpipeError):
    """params.yaml (or a CLI override) is invalid: unknown key, wrong type, value out of range."""


class DatasetError(FgpipeError):
    """A dataset on disk is missing, incomplete or malformed."""


class BadImagesError(DatasetError):
    """One or more images could not be decoded."""

    def __init__(self, root: str, bad: list[tuple[str, str]]) -> None:
        self.bad = bad
        shown = "\n".join(f"  {path}: {why}" for path, why in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        super().__init__(
            f"{len(bad)} image(s) under {root} cannot be read:\n{shown}{more}\n"
            "Fix or remove them, or set `skip_bad: true` for this dataset in params.yaml "
            "to skip them (they are counted in the prepare metrics)."
        )


class ArtifactError(FgpipeError):
    """An input artefact (manifest, checkpoint, HDF5 file) is missing, stale or from another run."""


class TrainingError(FgpipeError):
    """Training cannot go on (e.g. the loss became NaN)."""


class OutputError(FgpipeError):
    """An output cannot be written (disk full, read-only file system, no permission); the previous one is kept."""


def portable(exc: FgpipeError) -> FgpipeError:
    """``exc`` as an error that survives pickling (to another process: a DataLoader worker's, a torchrun rank's) with
    its message: its own class where that takes the message alone, else the nearest base class that does."""
    for cls in type(exc).__mro__:
        if issubclass(cls, FgpipeError) and "__init__" not in vars(cls):
            return exc if cls is type(exc) else cls(str(exc))
    return FgpipeError(str(exc))  # pragma: no cover - FgpipeError itself has no __init__


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM), with what the stage kept and how to go on (the CLI prints it and exits 130, or 143)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill PID``, a job scheduler or container stopping the run), raised by the handler the CLI installs
    (:func:`fgpipe.runtime.sigterm_raises`) so that it takes Ctrl-C's path: every ``except KeyboardInterrupt`` and
    cleanup runs, temporary files are removed, a training run says how to resume. The CLI exits 143 (128 + 15)."""
