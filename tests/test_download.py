"""`download nih` against a real HTTP server on 127.0.0.1 that serves small archives built here."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import shutil
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrfusion.cli import main
from cxrfusion.data import archive, download
from cxrfusion.data.archive import MARKER, CorruptArchive
from cxrfusion.data.download import NIH_FILES, Remote, download_nih
from cxrfusion.data.nih import find_images
from cxrfusion.errors import CxrError

SHARED_META = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih14-meta"


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _archive(first: int, count: int = 4) -> tuple[bytes, dict[str, bytes]]:
    """A .tar.gz in NIH's layout (`images/NNNNNNNN_000.png`) and its members."""
    members = {f"{first + i:08d}_000.png": _png(first + i) for i in range(count)}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"images/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue(), members


class _Handler(BaseHTTPRequestHandler):
    """Serves `server.files`; per file, `server.modes` may hold "norange" (ignore Range),
    "drop_once" (send half the body of the first response, then close the connection) and
    "slow" (trickle the body) and "busy_once" (answer 503 the first time)."""

    def do_GET(self) -> None:
        server = self.server
        name = self.path.lstrip("/")
        with server.lock:
            server.requests.append((name, self.headers.get("Range")))
            modes = server.modes.get(name, set())
            drop = "drop_once" in modes and name not in server.dropped
            if drop:
                server.dropped.add(name)
        if name not in server.files:
            self.send_error(404)
            return
        if "busy_once" in modes and name not in server.busy:
            server.busy.add(name)
            self.send_error(503)
            return
        body = server.files[name]
        start = 0
        if self.headers.get("Range") and int(self.headers["Range"][6:].split("-")[0]) >= len(body):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.end_headers()
            return
        range_header = self.headers.get("Range")
        if range_header and "norange" not in modes and not drop:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if "slow" in modes:  # 64 B every 10 ms
            for at in range(start, len(body), 64):
                self.wfile.write(body[at : at + 64])
                self.wfile.flush()
                time.sleep(0.01)
            return
        self.wfile.write(body[start : len(body) // 2] if drop else body[start:])

    def log_message(self, *args) -> None:
        return None


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch):
    monkeypatch.setattr(download, "RETRY_WAIT_S", 0.01)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.modes, httpd.requests = {}, {}, []
    httpd.dropped, httpd.busy, httpd.lock = set(), set(), threading.Lock()
    httpd.handle_error = lambda request, address: None  # a client that hung up on purpose
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def served(server):
    """Two archives and a label file with a known SHA-256 on the server, and their table."""
    table = b"Image Index,Finding Labels,Patient ID\n"
    archives = {n: _archive(100 * n) for n in (1, 2)}
    server.files["Data_Entry_2017_v2020.csv.gz"] = table
    for n, (data, _) in archives.items():
        server.files[f"images_{n:03d}.tar.gz"] = data
    remotes = [
        Remote(
            "Data_Entry_2017_v2020.csv.gz",
            "unused",
            len(table),
            hashlib.sha256(table).hexdigest(),
        ),
        Remote("images_001.tar.gz", "unused"),
        Remote("images_002.tar.gz", "unused"),
    ]
    return server, remotes, archives


def _fetch(out: Path, server, remotes, **kw):
    return download_nih(out, base_url=server.url, remotes=remotes, progress=False, **kw)


def _assert_extracted(out: Path, n: int, members: dict[str, bytes]) -> None:
    folder = out / f"images_{n:03d}" / "images"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == members
    assert (out / f"images_{n:03d}" / MARKER).is_file()


def _nothing_looks_complete(out: Path, n: int) -> None:
    """No finished archive, folder, marker or leftover temporary folder for archive `n`."""
    assert not (out / f"images_{n:03d}").exists()
    assert not (out / f"images_{n:03d}.tar.gz").exists()
    assert not list(out.glob(f".images_{n:03d}*"))


def test_download_verifies_and_extracts_into_the_layout_prepare_reads(served, tmp_path):
    server, remotes, archives = served
    outcomes = _fetch(tmp_path, server, remotes)
    assert [o.status for o in outcomes] == ["downloaded"] * 3
    assert outcomes[0].check == "size and SHA-256 ok"
    assert outcomes[1].check.startswith(download.NOT_VERIFIED)
    for n, (_, members) in archives.items():
        _assert_extracted(tmp_path, n, members)
    names = [name for _, members in archives.values() for name in members]
    found, missing = find_images(tmp_path, names)
    assert len(found) == 8 and missing == []
    assert not list(tmp_path.glob("*.part")) and not list(tmp_path.glob("*.tar.gz"))


def test_a_second_run_skips_completed_files_without_a_request(served, tmp_path):
    server, remotes, _ = served
    _fetch(tmp_path, server, remotes)
    server.requests.clear()
    outcomes = _fetch(tmp_path, server, remotes)
    assert server.requests == []
    assert [o.status for o in outcomes] == ["already complete"] * 3
    assert outcomes[1].images == 4


def test_a_dropped_connection_resumes_with_a_range_request(served, tmp_path):
    server, remotes, archives = served
    server.modes["images_001.tar.gz"] = {"drop_once"}
    outcomes = _fetch(tmp_path, server, remotes, keep_archives=True)
    requests = [r for name, r in server.requests if name == "images_001.tar.gz"]
    assert requests[0] is None
    assert requests[1] == f"bytes={len(archives[1][0]) // 2}-"
    assert outcomes[1].status == "resumed"
    assert (tmp_path / "images_001.tar.gz").read_bytes() == archives[1][0]
    _assert_extracted(tmp_path, 1, archives[1][1])


def test_a_server_without_range_support_restarts_from_zero(served, tmp_path):
    server, remotes, archives = served
    server.modes["images_002.tar.gz"] = {"drop_once", "norange"}
    _fetch(tmp_path, server, remotes, keep_archives=True)
    requests = [r for name, r in server.requests if name == "images_002.tar.gz"]
    assert len(requests) == 2 and requests[1] is not None  # asked for a range, got it all
    assert (tmp_path / "images_002.tar.gz").read_bytes() == archives[2][0]
    _assert_extracted(tmp_path, 2, archives[2][1])


def test_a_server_error_is_retried(served, tmp_path):
    server, remotes, archives = served
    server.modes["images_001.tar.gz"] = {"busy_once"}
    _fetch(tmp_path, server, remotes[1:2])
    assert [name for name, _ in server.requests] == ["images_001.tar.gz"] * 2
    _assert_extracted(tmp_path, 1, archives[1][1])


def test_a_complete_part_file_is_finished_without_downloading_it_again(served, tmp_path):
    server, remotes, archives = served
    (tmp_path / "images_001.tar.gz.part").write_bytes(archives[1][0])  # killed before the rename
    outcomes = _fetch(tmp_path, server, remotes[1:2])
    assert server.requests == [("images_001.tar.gz", f"bytes={len(archives[1][0])}-")]  # a 416
    assert outcomes[0].status == "resumed"
    _assert_extracted(tmp_path, 1, archives[1][1])


def test_a_corrupt_archive_is_an_error_and_nothing_looks_complete(served, tmp_path):
    server, remotes, archives = served
    data = bytearray(archives[1][0])
    data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)  # gzip stream broken midway
    server.files["images_001.tar.gz"] = bytes(data)
    with pytest.raises(CorruptArchive, match="images_001.tar.gz: corrupt"):
        _fetch(tmp_path, server, remotes[:2], workers=1)
    _nothing_looks_complete(tmp_path, 1)
    assert not list(tmp_path.glob("*.part"))


def test_a_checksum_mismatch_is_an_error_and_no_file_is_left(served, tmp_path):
    server, remotes, _ = served
    server.files["Data_Entry_2017_v2020.csv.gz"] = b"Image Index,Finding Labels,Patient IX\n"
    with pytest.raises(CxrError, match="SHA-256"):
        _fetch(tmp_path, server, remotes[:1])
    assert list(tmp_path.iterdir()) == []


def test_a_missing_file_raises_one_line_naming_the_url(served, tmp_path):
    server, remotes, _ = served
    del server.files["images_002.tar.gz"]
    with pytest.raises(CxrError) as error:
        _fetch(tmp_path, server, remotes[2:])
    assert str(error.value) == f"{server.url}/images_002.tar.gz: HTTP 404 Not Found"
    _nothing_looks_complete(tmp_path, 2)


def test_an_error_stops_the_other_transfers_and_keeps_their_part_files(
    served, tmp_path, monkeypatch
):
    server, remotes, _ = served
    data, _ = _archive(100, count=20)  # ~7 kB: about a second at the slow rate
    server.files["images_001.tar.gz"] = data
    server.modes["images_001.tar.gz"] = {"slow"}
    del server.files["images_002.tar.gz"]
    monkeypatch.setattr(download, "CHUNK", 256)
    with pytest.raises(CxrError, match="images_002.tar.gz: HTTP 404"):
        _fetch(tmp_path, server, remotes[1:], workers=2)
    assert (tmp_path / "images_001.tar.gz.part").stat().st_size < len(data)
    _nothing_looks_complete(tmp_path, 1)


class _FullDisk(io.BufferedWriter):
    """A file that accepts `room` bytes, then fails like a full disk (ENOSPC)."""

    room = 1000

    def write(self, data) -> int:
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def _full_disk(path: Path, mode: str) -> _FullDisk:
    return _FullDisk(open(path, mode, buffering=0))  # noqa: SIM115 (the caller closes it)


def test_a_full_disk_keeps_only_a_part_file_that_the_next_run_resumes(
    served, tmp_path, monkeypatch
):
    server, remotes, archives = served
    data, members = _archive(100, count=20)  # ~7 kB: several chunks of 512 B
    server.files["images_001.tar.gz"] = data
    monkeypatch.setattr(download, "CHUNK", 512)
    monkeypatch.setattr(download, "_open_part", _full_disk)
    with pytest.raises(CxrError, match="No space left on device"):
        _fetch(tmp_path, server, remotes[1:2])
    _nothing_looks_complete(tmp_path, 1)
    part = tmp_path / "images_001.tar.gz.part"
    kept = part.stat().st_size
    assert 0 < kept < len(server.files["images_001.tar.gz"])

    monkeypatch.undo()
    server.requests.clear()
    outcomes = _fetch(tmp_path, server, remotes[1:2])
    assert server.requests == [("images_001.tar.gz", f"bytes={kept}-")]
    assert outcomes[0].status == "resumed"
    _assert_extracted(tmp_path, 1, members)


def test_from_dir_extracts_archives_already_on_disk_without_network(tmp_path):
    offline = tmp_path / "offline"
    offline.mkdir()
    data, members = _archive(300)
    (offline / "images_03.tar.gz").write_bytes(data)  # the name NIH's own script saves
    outcomes = download_nih(
        tmp_path / "nih",
        only=[3],
        from_dir=offline,
        base_url="http://127.0.0.1:9",  # never contacted
        remotes=NIH_FILES,
        progress=False,
    )
    by_name = {o.name: o for o in outcomes}
    assert by_name["images_003.tar.gz"].status == "from DIR"
    assert by_name["test_list.txt"].status == "not in DIR"
    _assert_extracted(tmp_path / "nih", 3, members)
    assert (offline / "images_03.tar.gz").exists()  # the user's file is left alone


def test_only_rejects_an_archive_number_nih_does_not_have(tmp_path):
    with pytest.raises(CxrError, match="--only: archive numbers are 1 to 12, got 13"):
        download_nih(tmp_path, only=[13], from_dir=tmp_path, progress=False)


def test_cli_fetches_the_real_metadata_with_its_published_checksums(server, tmp_path, capsys):
    meta = SHARED_META
    if not meta.exists():
        pytest.skip(f"real NIH metadata not found at {meta}")
    for name in ("Data_Entry_2017_v2020.csv.gz", "BBox_List_2017.csv.gz"):
        source = "Data_Entry_2017.csv.gz" if name.startswith("Data_Entry") else name
        server.files[name] = (meta / source).read_bytes()
    for name in ("train_val_list.txt", "test_list.txt"):
        server.files[name] = gzip.decompress((meta / f"{name}.gz").read_bytes())
    server.files["images_005.tar.gz"], _ = _archive(500)
    args = ["download", "nih", "--out", str(tmp_path / "nih"), "--only", "5"]
    code = main([*args, "--base-url", server.url])
    printed = capsys.readouterr().out
    assert code == 0
    assert printed.count("size and SHA-256 ok") == 4
    assert "4 images" in printed

    shutil.rmtree(tmp_path / "nih")
    server.files["test_list.txt"] += b"\n00000000_000.png"
    assert main([*args, "--base-url", server.url]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    size = len(server.files["test_list.txt"])
    assert error.startswith("cxrfusion download: error: ")
    assert error.endswith(f"test_list.txt has {size:,} bytes, expected 435,131")
    assert not (tmp_path / "nih" / "test_list.txt").exists()


def _member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""):
    """A tar member: `kind` is tarfile's REGTYPE, DIRTYPE, SYMTYPE, ...; `link` a link's target."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size, info.mode = kind, link, len(data), 0o755
    return info, data


def _tar_gz(members: list) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _symlink_chain(out: Path) -> tuple[list, str]:
    """CPython's regression archive for CVE-2025-4517 (test_realpath_limit_attack), aimed two
    levels above the extraction folder `OUT/.images_001.extracting`, i.e. beside OUT: expanding
    the chain of symlinks exceeds PATH_MAX, so the `data` filter's realpath stops expanding and
    takes `escape` for a folder inside. Through it, Python 3.11.7's extraction overwrote
    `victim.txt` beside OUT (via a hard link) and created `planted` there."""
    dest = out / ".images_001.extracting"
    steps = "abcdefghijklmnop"
    path_max = os.pathconf(out.parent, "PC_PATH_MAX")
    component = "d" * ((path_max - len(str(dest)) - 1) // (len(steps) + 1))
    members, path = [], ""
    for step in steps:
        members += [
            _member(path + component, kind=tarfile.DIRTYPE),
            _member(path + step, kind=tarfile.SYMTYPE, link=component),
        ]
        path += component + "/"
    link = "/".join(steps) + "/" + "l" * 254
    members += [
        _member(link, kind=tarfile.SYMTYPE, link="/".join([".."] * len(steps))),
        _member("escape", kind=tarfile.SYMTYPE, link=link + "/../.."),
        _member("flaglink", kind=tarfile.LNKTYPE, link="escape/victim.txt"),
        _member("flaglink", b"overwritten"),
        _member("escape/planted", b"new"),
    ]
    return members, component


def _bomb(out: Path) -> tuple[list, str]:
    """Three members of 512 KiB of zeros (under 1 kB compressed each) against a 1 MiB cap."""
    names = [f"images/{i:08d}_000.png" for i in range(3)]
    return [_member(name, bytes(512 << 10)) for name in names], names[2]


_UNSAFE = {
    "CVE-2025-4517 symlink chain": _symlink_chain,
    "../ in a name": lambda out: (
        [_member("images/../../planted", b"new")],
        "images/../../planted",
    ),
    "absolute name": lambda out: (
        [_member(f"{out.parent}/planted", b"new")],
        f"{out.parent}/planted",
    ),
    "symlink": lambda out: (
        [
            _member("images/up", kind=tarfile.SYMTYPE, link="../.."),
            _member("images/up/planted", b"new"),
        ],
        "images/up",
    ),
    "hard link": lambda out: (
        [
            _member("images/x.png", kind=tarfile.LNKTYPE, link="../../victim.txt"),
            _member("images/x.png", b"overwritten"),
        ],
        "images/x.png",
    ),
    "fifo": lambda out: ([_member("images/pipe", kind=tarfile.FIFOTYPE)], "images/pipe"),
    "file outside images/": lambda out: ([_member("planted", b"new")], "planted"),
    "gzip bomb": _bomb,
}


def _beside(out: Path) -> dict[str, bytes | str]:
    """Everything in OUT's parent but OUT itself: each file's bytes, link's target, folder."""
    found = {}
    for root, folders, files in os.walk(out.parent):
        if Path(root) == out.parent and out.name in folders:
            folders.remove(out.name)
        for name in folders + files:
            path = Path(root, name)
            key = str(path.relative_to(out.parent))
            if path.is_symlink():
                found[key] = "-> " + os.readlink(path)
            else:
                found[key] = path.read_bytes() if path.is_file() else "folder"
    return found


@pytest.mark.parametrize("case", list(_UNSAFE))
def test_an_unsafe_archive_is_refused_in_one_line_and_nothing_is_written_outside_out(
    case, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(archive, "MAX_EXTRACT_BYTES", 1 << 20)
    offline, out = tmp_path / "offline", tmp_path / "out"
    offline.mkdir()
    out.mkdir()
    (tmp_path / "victim.txt").write_bytes(b"precious")
    members, offending = _UNSAFE[case](out)
    (offline / "images_001.tar.gz").write_bytes(_tar_gz(members))
    before = _beside(out)

    code = main(["download", "nih", "--from", str(offline), "--out", str(out), "--only", "1"])

    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("cxrfusion download: error: ")
    assert "images_001.tar.gz" in lines[0] and repr(offending) in lines[0]
    assert _beside(out) == before
    _nothing_looks_complete(out, 1)


@pytest.mark.parametrize("planted", ["symlink", "dangling symlink", "hard link"])
def test_a_link_planted_at_the_part_name_is_refused_and_not_written_through(
    served, tmp_path, planted
):
    server, remotes, _ = served
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    part = out / "images_001.tar.gz.part"
    if planted != "dangling symlink":
        victim.write_bytes(b"precious")
    if planted == "hard link":
        os.link(victim, part)
    else:
        part.symlink_to(victim)
    with pytest.raises(CxrError, match=r"images_001\.tar\.gz\.part: unexpected symlink or file"):
        _fetch(out, server, remotes[1:2])
    expected = None if planted == "dangling symlink" else b"precious"
    assert (victim.read_bytes() if victim.exists() else None) == expected


def test_a_symlink_planted_at_the_old_copy_name_is_not_written_through(tmp_path):
    offline, out, victim = tmp_path / "offline", tmp_path / "out", tmp_path / "victim.txt"
    offline.mkdir()
    out.mkdir()
    (offline / "notes.txt").write_bytes(b"from the mirror")
    victim.write_bytes(b"precious")
    (out / ".notes.txt.copy").symlink_to(victim)
    download_nih(out, from_dir=offline, remotes=[Remote("notes.txt", "unused")], progress=False)
    assert victim.read_bytes() == b"precious"
    assert not (out / "notes.txt").is_symlink()
    assert (out / "notes.txt").read_bytes() == b"from the mirror"
