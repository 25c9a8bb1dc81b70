"""fetch_and_extract against a local HTTP server, and `fgpipe prepare --download` end to end."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import write_fake_aircraft, write_fake_cub, write_params
from typer.testing import CliRunner

from fgpipe.cli import app
from fgpipe.config import load_params
from fgpipe.datasets import aircraft, cub
from fgpipe.datasets.download import fetch_and_extract
from fgpipe.errors import DatasetError
from fgpipe.manifest import read_manifest
from fgpipe.stages import prepare


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """(base url, served folder): a static HTTP server on 127.0.0.1, an ephemeral port."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    served = tmp_path / "served"
    served.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _tar_folder(archive: Path, folder: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname=arcname)
    return archive


def _tar_members(archive: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(archive, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return archive


def _zip_members(archive: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return archive


def _digest(path: Path, algo: str) -> str:
    return hashlib.new(algo, path.read_bytes()).hexdigest()


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


PKG = {"pkg/a.txt": b"alpha", "pkg/sub/b.txt": b"beta", "other/c.txt": b"gamma"}


@pytest.mark.parametrize("algo", ["md5", "sha256", None])
def test_tar_download_extracts_member(tmp_path: Path, server, algo: str | None, capsys) -> None:
    base, served = server
    archive = _tar_members(served / "pkg.tar.gz", PKG)
    dest = tmp_path / "out" / "dataset"
    checksum = {algo: _digest(archive, algo)} if algo else {}
    fetch_and_extract(f"{base}/pkg.tar.gz", dest=dest, member="pkg", **checksum)
    assert (dest / "a.txt").read_bytes() == b"alpha" and (dest / "sub/b.txt").read_bytes() == b"beta"
    assert _leftovers(dest.parent) == ["dataset"]  # the temporary folder is gone, `other/` with it
    warned = "used unverified" in capsys.readouterr().err
    assert warned == (algo is None)


def test_zip_download(tmp_path: Path, server) -> None:
    base, served = server
    archive = _zip_members(served / "pkg.zip", PKG)
    dest = tmp_path / "dataset"
    fetch_and_extract(f"{base}/pkg.zip", dest=dest, member="pkg", sha256=_digest(archive, "sha256"))
    assert (dest / "sub/b.txt").read_bytes() == b"beta"


def test_wrong_checksum_leaves_nothing(tmp_path: Path, server) -> None:
    base, served = server
    archive = _tar_members(served / "pkg.tar.gz", PKG)
    dest = tmp_path / "out" / "dataset"
    url = f"{base}/pkg.tar.gz"
    with pytest.raises(DatasetError) as exc:
        fetch_and_extract(url, dest=dest, member="pkg", md5="0" * 32)
    msg = str(exc.value)
    assert url in msg and f"expected md5 {'0' * 32}, got {_digest(archive, 'md5')}" in msg
    assert not dest.exists() and _leftovers(dest.parent) == []


def test_http_404_is_a_clear_error(tmp_path: Path, server) -> None:
    base, _ = server
    url = f"{base}/missing.tar.gz"
    with pytest.raises(DatasetError, match=rf"download of {url} failed: HTTP 404"):
        fetch_and_extract(url, dest=tmp_path / "dataset", member="pkg", md5="0" * 32)
    assert _leftovers(tmp_path) == ["served"]


def test_unreachable_server(tmp_path: Path, server) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DatasetError, match=rf"cannot reach http://127\.0\.0\.1:{port}/x\.tgz"):
        fetch_and_extract(f"http://127.0.0.1:{port}/x.tgz", dest=tmp_path / "dataset", member="pkg")


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_escaping_member_refused(tmp_path: Path, server, kind: str) -> None:
    base, served = server
    members = {"pkg/a.txt": b"alpha", "../evil.txt": b"pwned"}
    name = "bad.tar.gz" if kind == "tar" else "bad.zip"
    archive = (_tar_members if kind == "tar" else _zip_members)(served / name, members)
    dest = tmp_path / "out" / "dataset"
    with pytest.raises(DatasetError, match=r"has a member that would escape the extraction folder"):
        fetch_and_extract(f"{base}/{name}", dest=dest, member="pkg", sha256=_digest(archive, "sha256"))
    assert not dest.exists() and _leftovers(dest.parent) == []
    assert not list(tmp_path.rglob("evil.txt"))


def test_missing_member_and_not_an_archive(tmp_path: Path, server) -> None:
    base, served = server
    archive = _tar_members(served / "pkg.tar.gz", PKG)
    with pytest.raises(DatasetError, match=r"has no top-level folder 'CUB_200_2011' \(it holds: other, pkg\)"):
        fetch_and_extract(f"{base}/pkg.tar.gz", dest=tmp_path / "d", member="CUB_200_2011", md5=_digest(archive, "md5"))
    (served / "page.html").write_text("<html>not an archive</html>")
    with pytest.raises(DatasetError, match=r"page\.html is neither a tar nor a zip archive"):
        fetch_and_extract(f"{base}/page.html", dest=tmp_path / "d", member="pkg")
    assert _leftovers(tmp_path) == ["served"]


def test_existing_dest_refused(tmp_path: Path, server) -> None:
    base, served = server
    _tar_members(served / "pkg.tar.gz", PKG)
    (tmp_path / "dataset").mkdir()
    with pytest.raises(DatasetError, match=r"dataset already exists"):
        fetch_and_extract(f"{base}/pkg.tar.gz", dest=tmp_path / "dataset", member="pkg")


# --------------------------------------------------------------------------- through prepare and the CLI
def test_cli_prepare_download_cub(tmp_path: Path, server, monkeypatch: pytest.MonkeyPatch) -> None:
    base, served = server
    write_fake_cub(tmp_path / "staging" / "CUB_200_2011")
    archive = _tar_folder(served / "CUB_200_2011.tgz", tmp_path / "staging" / "CUB_200_2011", "CUB_200_2011")
    monkeypatch.setattr(cub, "URL", f"{base}/CUB_200_2011.tgz")
    monkeypatch.setattr(cub, "MD5", _digest(archive, "md5"))
    root = tmp_path / "raw" / "CUB_200_2011"
    params = write_params(tmp_path, {"cub": {"kind": "cub", "root": str(root)}})

    result = CliRunner().invoke(app, ["prepare", "--dataset", "cub", "--params", str(params)])
    assert result.exit_code == 1 and "dataset root not found" in result.output and "--download" in result.output

    result = CliRunner().invoke(app, ["prepare", "--dataset", "cub", "--params", str(params), "--download"])
    assert result.exit_code == 0, result.output
    assert (root / "images.txt").is_file()
    assert len(read_manifest(tmp_path / "data/cub/manifest.csv")) == 18
    assert '"total": 18' in result.output


def test_cli_prepare_download_bad_checksum(tmp_path: Path, server, monkeypatch: pytest.MonkeyPatch) -> None:
    base, served = server
    write_fake_cub(tmp_path / "staging" / "CUB_200_2011")
    _tar_folder(served / "CUB_200_2011.tgz", tmp_path / "staging" / "CUB_200_2011", "CUB_200_2011")
    monkeypatch.setattr(cub, "URL", f"{base}/CUB_200_2011.tgz")
    monkeypatch.setattr(cub, "MD5", "f" * 32)
    root = tmp_path / "raw" / "CUB_200_2011"
    params = write_params(tmp_path, {"cub": {"kind": "cub", "root": str(root)}})
    result = CliRunner().invoke(app, ["prepare", "-d", "cub", "-p", str(params), "--download"])
    assert result.exit_code == 1
    assert "error:" in result.output and "checksum mismatch" in result.output and "f" * 32 in result.output
    assert not root.exists() and _leftovers(root.parent) == []


def test_prepare_download_aircraft(tmp_path: Path, server, monkeypatch: pytest.MonkeyPatch) -> None:
    base, served = server
    info = write_fake_aircraft(tmp_path / "staging" / "fgvc-aircraft-2013b")
    archive = _tar_folder(served / "air.tar.gz", tmp_path / "staging" / "fgvc-aircraft-2013b", "fgvc-aircraft-2013b")
    monkeypatch.setattr(aircraft, "URL", f"{base}/air.tar.gz")
    monkeypatch.setattr(aircraft, "SHA256", _digest(archive, "sha256"))
    root = tmp_path / "raw" / "fgvc-aircraft-2013b"
    settings = load_params(write_params(tmp_path, {"air": {"kind": "aircraft", "root": str(root), "download": True}}))
    metrics = prepare.run(settings, "air").metrics
    assert metrics["images"]["total"] == len(info["split"])


def test_cars_has_nothing_to_download(tmp_path: Path) -> None:
    settings = load_params(write_params(tmp_path, {"cars": {"kind": "cars", "root": str(tmp_path / "nope"), "download": True}}))
    with pytest.raises(DatasetError, match=r"cars has no official archive to download: Stanford Cars: the original download"):
        prepare.run(settings, "cars")
