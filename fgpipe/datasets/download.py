"""Fetch an official dataset archive, verify it and extract one folder of it atomically.

Everything happens in a temporary folder next to ``dest`` (same filesystem), so the final step is a
single ``os.replace``: ``dest`` either appears complete or not at all, and a failed or interrupted
download leaves nothing behind at ``dest``. A full disk or a read-only folder is one clean error naming ``dest``.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from rich.progress import DownloadColumn, TransferSpeedColumn

from fgpipe.console import console, progress
from fgpipe.errors import DatasetError
from fgpipe.store import output_error

CHUNK = 1 << 20
TIMEOUT_S = 60.0
# a full disk or quota, a file too large, a read-only or forbidden folder: reported as a failed write of dest
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


def fetch_and_extract(
    url: str,
    *,
    dest: str | os.PathLike[str],
    member: str,
    md5: str | None = None,
    sha256: str | None = None,
    setting: str = "datasets.NAME.root",
) -> None:
    """Download ``url``, check its checksum, extract it and move the archive's ``member`` folder to ``dest``.

    At most one of ``md5``/``sha256`` is expected; with neither the archive is used unverified (a
    warning says so). Raises DatasetError naming the url (and the expected/actual checksum on a mismatch); a
    failed write, an OutputError naming ``dest`` and ``setting``, the params key that chooses it.
    """
    dest = Path(dest)
    if md5 and sha256:
        raise ValueError("pass md5 or sha256, not both")
    if dest.exists():
        raise DatasetError(f"{dest} already exists; remove it to download {url} again")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.download-", dir=dest.parent))
    except OSError as exc:
        raise output_error(dest, exc, setting=setting) from None
    try:
        archive = work / "archive"
        algo, expected = ("md5", md5) if md5 else ("sha256", sha256)
        actual = _download(url, archive, algo)
        if expected is None:
            console.print(f"[yellow]no checksum is known for {url}: the archive is used unverified "
                          f"(its sha256 is {actual})", soft_wrap=True)
        elif actual.lower() != expected.lower():
            raise DatasetError(
                f"checksum mismatch for {url}: expected {algo} {expected.lower()}, got {actual.lower()}. "
                "The download is corrupt or the file on the server changed; nothing was extracted."
            )
        extracted = work / "extracted"
        extracted.mkdir()
        _extract(archive, extracted, url)
        src = extracted / member
        if not src.is_dir():
            found = ", ".join(sorted(p.name for p in extracted.iterdir())) or "(nothing)"
            raise DatasetError(f"archive {url} has no top-level folder {member!r} (it holds: {found})")
        os.replace(src, dest)
        console.print(f"extracted {url} to {dest}", soft_wrap=True)
    except OSError as exc:  # the network's errors are DatasetErrors by now: this is writing the archive or its files
        if exc.errno in _DISK_ERRNOS:
            raise output_error(dest, exc, setting=setting) from None
        raise DatasetError(f"download of {url} to {dest} failed: {exc}; run the command again") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)  # cleanup only: the archive and partial extraction


def _download(url: str, target: Path, algo: str) -> str:
    """Stream ``url`` to ``target`` with a progress bar; return the hex digest (``algo``) of its bytes."""
    digest = hashlib.new(algo)
    request = urllib.request.Request(url, headers={"User-Agent": "fgpipe"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as resp, open(target, "wb") as out:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with progress(DownloadColumn(), TransferSpeedColumn()) as bar:
                task = bar.add_task(f"downloading {PurePosixPath(url).name}", total=total)
                while chunk := resp.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.advance(task, len(chunk))
    except urllib.error.HTTPError as exc:
        raise DatasetError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise DatasetError(f"cannot reach {url}: {exc.reason} (check the network or a proxy setting)") from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        raise DatasetError(f"download of {url} was interrupted: {exc}; run the command again") from None
    return digest.hexdigest()


def _extract(archive: Path, out: Path, url: str) -> None:
    """Extract a tar (any compression) or zip archive into ``out``, refusing members that escape it."""
    if tarfile.is_tarfile(archive):
        try:
            with tarfile.open(archive, mode="r:*") as tf, progress() as bar:
                task = bar.add_task("extracting", total=None)
                for info in tf:
                    # the "data" filter refuses absolute links, `..` escapes, devices and setuid bits
                    tf.extract(info, out, filter="data")
                    bar.advance(task)
        except tarfile.FilterError as exc:
            raise DatasetError(f"archive {url} has a member that would escape the extraction folder: {exc}") from None
        except (tarfile.TarError, EOFError) as exc:
            raise DatasetError(f"archive {url} is damaged: {exc}") from None
    elif zipfile.is_zipfile(archive):
        try:
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    p = PurePosixPath(name.replace("\\", "/"))
                    if p.is_absolute() or ".." in p.parts or (p.parts and p.parts[0].endswith(":")):
                        raise DatasetError(
                            f"archive {url} has a member that would escape the extraction folder: {name!r}"
                        )
                zf.extractall(out)
        except zipfile.BadZipFile as exc:
            raise DatasetError(f"archive {url} is damaged: {exc}") from None
    else:
        raise DatasetError(f"{url} is neither a tar nor a zip archive")
