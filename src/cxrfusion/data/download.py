"""`cxrfusion download nih`: the ChestX-ray14 files, resumable, verified and extracted atomically.

Each file is downloaded to `NAME.part` (resumed with an HTTP Range request after a dropped
connection; a server that ignores Range restarts it from zero), checked against the size and
SHA-256 recorded in `NIH_FILES` where they are known, then renamed to `NAME`. An archive is
extracted into a hidden temporary folder that is renamed to `images_NNN/` only once every member
is out, with a marker file inside: a folder without the marker was never finished. So an
interruption at any moment leaves nothing that looks complete, and a re-run skips what is.
Only folders and plain files under `images/` are extracted, `MAX_EXTRACT_BYTES` at most: an
archive holding a link, a special file, another path or more bytes is refused whole.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import logging
import os
import shutil
import stat
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from cxrfusion.atomic import atomic_path
from cxrfusion.data.archive import MARKER, CorruptArchive, extract_archive
from cxrfusion.errors import CxrError

log = logging.getLogger(__name__)

BASE_URL_ENV = "CXRFUSION_NIH_BASE_URL"
ARCHIVE_COUNT = 12
CHUNK = 1 << 20
NOT_VERIFIED = "size/checksum not published: not verified"
RETRY_WAIT_S = 1.0  # before retry k (0-based): RETRY_WAIT_S * 2**k seconds
_NOT_OURS = "unexpected symlink or file at this temporary name: not written through; remove it"

_BOX = "https://nihcc.box.com/shared/static/"
_TXRV = "https://raw.githubusercontent.com/mlmed/torchxrayvision/8ef884614164d54e2660947241ab0276b29526e9/torchxrayvision/data/"
_LISTS = "https://raw.githubusercontent.com/Lasaj/emaim/0cc2a787025f1c547fc7b7d8e4acb0b56215ad53/ChestX-ray14/"
_BOX_IDS = (
    "vfk49d74nhbxq3nqjg0900w5nvkorp5c",
    "i28rlmbvmfjbl8p2n3ril0pptcmcu9d1",
    "f1t00wrtdk94satdfb9olcolqx20z2jp",
    "0aowwzs5lhjrceb3qp67ahp0rd1l1etg",
    "v5e3goj22zr6h8tzualxfsqlqaygfbsn",
    "asi7ikud9jwnkrnkj99jnpfkjdes7l6l",
    "jn1b4mw4n6lnh74ovmcjb8y48h8xj07n",
    "tvpxmn7qyrgl0w8wfh9kqfjskv6nmm1j",
    "upyy3ml7qdumlgk2rfcvlb9k6gvqq2pj",
    "l6nilvfa9cg3s28tqv1qc1olm3gnz54p",
    "hhq8fkdgvcari67vfhs7ppg2w6ni4jze",
    "ioqwiy20ihqwyr8pf4c24eazhh281pbu",
)


@dataclass(frozen=True)
class Remote:
    """One file to fetch.

    Args:
        name: file name in the output folder (and under a mirror's base URL).
        url: where it is published.
        size: bytes, where established from a public source; None where unknown.
        sha256: hex digest, where established; None where unknown.
    """

    name: str
    url: str
    size: int | None = None
    sha256: str | None = None

    @property
    def is_archive(self) -> bool:
        return self.name.endswith(".tar.gz")


# The label table, lists and boxes: NIH's Box folder gives them no static link, so these are
# public copies pinned to a commit, byte-identical to NIH's files (the table is NIH's 2020
# revision); sizes and SHA-256 were computed from those commits. The archives are the links of
# NIH's `batch_download_zips.py`; NIH publishes no size or checksum for them (the gzip CRC of
# each member is still checked while extracting).
NIH_FILES: tuple[Remote, ...] = (
    Remote(
        "Data_Entry_2017_v2020.csv.gz",
        _TXRV + "Data_Entry_2017_v2020.csv.gz",
        978381,
        "9d4de640ee4f760215d8be98376b20387ca52f9c6b4d1b727cb588fb82f40b80",
    ),
    Remote(
        "BBox_List_2017.csv.gz",
        _TXRV + "BBox_List_2017.csv.gz",
        22040,
        "cf9dc6029f65daa8b389415b0546af0eeeb91fbac7d63ec49d7f8de2fd8f40cd",
    ),
    Remote(
        "train_val_list.txt",
        _LISTS + "train_val_list.txt",
        1470907,
        "61fbe896321c1c1c8b75f3e4f3a08e4fef6486d95ef8a667c31d4d60dca6cb81",
    ),
    Remote(
        "test_list.txt",
        _LISTS + "test_list.txt",
        435131,
        "38ca5ef7f756092946f57c1a59faca882ed589a1ab1f72590b45dc06c6d5e1cc",
    ),
    *(
        Remote(f"images_{i:03d}.tar.gz", f"{_BOX}{box_id}.gz")
        for i, box_id in enumerate(_BOX_IDS, start=1)
    ),
)


class _Stopped(Exception):
    """Another transfer failed or the user pressed Ctrl-C: this one stops, its `.part` kept."""


@dataclass(frozen=True)
class Outcome:
    """What happened to one file: `status` is downloaded, resumed, already complete, from DIR or
    not in DIR; `check` says what was verified; `images` counts extracted files."""

    name: str
    status: str
    bytes: int
    check: str
    images: int | None = None


def select(remotes: Sequence[Remote], only: Sequence[int] | None) -> list[Remote]:
    """All metadata files plus the archives numbered in `only` (1-12; None: all)."""
    if only is None:
        return list(remotes)
    bad = [n for n in only if not 1 <= n <= ARCHIVE_COUNT]
    if bad:
        raise CxrError(f"--only: archive numbers are 1 to {ARCHIVE_COUNT}, got {bad[0]}")
    wanted = {f"images_{n:03d}.tar.gz" for n in only}
    return [r for r in remotes if not r.is_archive or r.name in wanted]


def download_nih(
    out: Path,
    only: Sequence[int] | None = None,
    workers: int = 4,
    base_url: str | None = None,
    from_dir: Path | None = None,
    keep_archives: bool = False,
    remotes: Sequence[Remote] = NIH_FILES,
    retries: int = 5,
    progress: bool = True,
) -> list[Outcome]:
    """Fetch, verify and extract the NIH files into `out` (the layout `prepare` reads).

    Args:
        out: dataset folder; archives end up as `images_NNN/images/*.png`.
        only: archive numbers to fetch (1-12); the small metadata files always come.
        workers: files fetched at once.
        base_url: a mirror holding the files under their names (`BASE/images_001.tar.gz`);
            default: the `CXRFUSION_NIH_BASE_URL` environment variable, else `NIH_FILES`' URLs.
        from_dir: offline sites: take the files from this folder instead of the network
            (archives may be named `images_001.tar.gz` or, as NIH's script saves them,
            `images_01.tar.gz`); nothing is downloaded.
        keep_archives: keep each `.tar.gz` after extraction (default: delete it, saving ~45 GB).
        remotes: the file table (tests pass their own).
        retries: connection attempts per file beyond the first, each resuming the `.part`.
        progress: show a byte progress bar.

    Raises:
        CxrError: a 404 or other HTTP error, a size or checksum mismatch, a corrupt archive, a
            full disk, a missing file in `from_dir`. What was verified stays; nothing half-done
            looks complete.
    """
    if from_dir is not None and not Path(from_dir).is_dir():
        raise CxrError(f"--from {from_dir}: not a folder")
    if workers < 1:
        raise CxrError(f"--workers must be >= 1, got {workers}")
    todo = select(remotes, only)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base_url = base_url or os.environ.get(BASE_URL_ENV)
    bar = tqdm(
        total=sum(r.size or 0 for r in todo),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="download",
        disable=None if progress else True,
    )
    fetcher = _Fetcher(out, base_url, from_dir, keep_archives, retries, bar)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            try:
                futures = [pool.submit(fetcher.fetch, remote) for remote in todo]
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                for future in done:
                    if future.exception() is not None:
                        future.result()  # raises it, before waiting on the others
                return [future.result() for future in futures]
            except BaseException:
                # an error or Ctrl-C: the other transfers stop at their next chunk, .part kept
                fetcher.stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        bar.close()


def summary(outcomes: Sequence[Outcome], out: Path) -> str:
    """A few lines for the terminal: each file, what was verified, then the totals."""
    lines = [
        f"{o.name:<30} {o.status:<17} {o.bytes / 2**20:>10,.1f} MiB  {o.check}"
        + (f", {o.images:,} images" if o.images is not None else "")
        for o in outcomes
    ]
    total = sum(o.bytes for o in outcomes)
    images = sum(o.images or 0 for o in outcomes)
    lines.append(f"{out}: {total / 2**30:,.2f} GiB in {len(outcomes)} files, {images:,} images")
    return "\n".join(lines)


def _open_part(path: Path, mode: str) -> BinaryIO:
    """Open a `.part` file to append to ("ab") or as a new file ("wb"); a seam for tests that
    simulate a full disk.

    Its name is predictable (resuming needs it), so neither mode goes through a symlink planted
    there in a shared folder, and a new file is created exclusively.
    """
    flags = os.O_WRONLY | os.O_NOFOLLOW | (os.O_APPEND if mode == "ab" else os.O_CREAT | os.O_EXCL)
    try:
        return os.fdopen(os.open(path, flags, 0o666), mode)
    except OSError as error:
        if error.errno not in (errno.ELOOP, errno.EEXIST):
            raise
        raise CxrError(f"{path}: {_NOT_OURS}") from None


def _part_size(part: Path) -> int:
    """Bytes already in `part` (0 if there is none); a symlink, a hard link to another file or
    anything but a plain file is refused."""
    try:
        info = part.lstat()
    except FileNotFoundError:
        return 0
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        raise CxrError(f"{part}: {_NOT_OURS}")
    return info.st_size


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, remote: Remote, origin: str, expected_size: int | None) -> str:
    """Check size and SHA-256 where known; return what was checked."""
    size = path.stat().st_size
    want = remote.size if remote.size is not None else expected_size
    if want is not None and size != want:
        raise CxrError(f"{origin}: {remote.name} has {size:,} bytes, expected {want:,}")
    if remote.sha256 is None and remote.size is None:
        return NOT_VERIFIED + ("" if want is None else " (length as the server announced)")
    if remote.sha256 is None:
        return "size ok; checksum not published: not verified"
    got = _sha256(path)
    if got != remote.sha256:
        raise CxrError(f"{origin}: {remote.name} SHA-256 {got[:12]}... != {remote.sha256[:12]}...")
    return "size and SHA-256 ok"


def _is_done(out: Path, remote: Remote) -> bool:
    if remote.is_archive:
        return (out / _folder(remote) / MARKER).is_file()
    return (out / remote.name).is_file()


def _folder(remote: Remote) -> str:
    return remote.name.removesuffix(".tar.gz")


@dataclass
class _Fetcher:
    """Fetches one file at a time (called from worker threads; shares only the bar)."""

    out: Path
    base_url: str | None
    from_dir: Path | None
    keep_archives: bool
    retries: int
    bar: tqdm
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _counted: set[str] = field(default_factory=set)
    stop: threading.Event = field(default_factory=threading.Event)

    def fetch(self, remote: Remote) -> Outcome:
        if _is_done(self.out, remote):
            return self._already(remote)
        if self.from_dir is not None:
            return self._from_disk(remote)
        url = f"{self.base_url.rstrip('/')}/{remote.name}" if self.base_url else remote.url
        target = self.out / remote.name
        status = "downloaded"
        if not target.exists():
            status, total = self._download(url, remote, target)
            part = target.with_name(target.name + ".part")
            try:
                check = _verify(part, remote, url, total)
            except CxrError:
                part.unlink()
                raise
            os.replace(part, target)
        else:
            check = _verify(target, remote, str(target), None)
        nbytes = target.stat().st_size
        if not remote.is_archive:
            return Outcome(remote.name, status, nbytes, check)
        try:
            images = extract_archive(target, self.out / _folder(remote), check)
        except CorruptArchive:
            target.unlink()  # no checksum caught it: the next run fetches it anew
            raise
        if not self.keep_archives:
            target.unlink()
        return Outcome(remote.name, status, nbytes, check, images)

    def _already(self, remote: Remote) -> Outcome:
        if remote.is_archive:
            marker = json.loads((self.out / _folder(remote) / MARKER).read_text())
            return Outcome(
                remote.name, "already complete", marker["bytes"], marker["check"], marker["images"]
            )
        path = self.out / remote.name
        return Outcome(remote.name, "already complete", path.stat().st_size, "verified before")

    def _from_disk(self, remote: Remote) -> Outcome:
        source = _find_local(self.from_dir, remote)
        if source is None:
            if remote.is_archive:
                raise CxrError(f"--from {self.from_dir}: {remote.name} not found")
            return Outcome(remote.name, "not in DIR", 0, "skipped")
        if source.name == remote.name or remote.is_archive:
            check = _verify(source, remote, str(source), None)
        else:  # the plain form of a .gz: the recorded size and checksum do not apply
            check = NOT_VERIFIED
        nbytes = source.stat().st_size
        self.bar.update(nbytes)
        if remote.is_archive:
            images = extract_archive(source, self.out / _folder(remote), check)
            return Outcome(remote.name, "from DIR", nbytes, check, images)
        with atomic_path(self.out / source.name) as tmp:
            shutil.copyfile(source, tmp)
        return Outcome(source.name, "from DIR", nbytes, check)

    def _download(self, url: str, remote: Remote, target: Path) -> tuple[str, int | None]:
        """Download into `target.part`, resuming; return (status, total size the server gave)."""
        part = target.with_name(target.name + ".part")
        status = "resumed" if part.exists() else "downloaded"
        for attempt in range(self.retries + 1):
            try:
                total = self._transfer(url, part, remote)
            except (http.client.HTTPException, ConnectionError, TimeoutError) as error:
                log.info("%s: attempt %d interrupted (%s)", url, attempt + 1, error)
            except urllib.error.HTTPError as error:
                if error.code < 500 and error.code != 429:  # only overload and server errors pass
                    raise CxrError(f"{url}: HTTP {error.code} {error.reason}") from None
                log.info("%s: attempt %d got HTTP %d", url, attempt + 1, error.code)
            except urllib.error.URLError as error:
                log.info("%s: attempt %d failed (%s)", url, attempt + 1, error.reason)
            else:
                if total is None or part.stat().st_size >= total:
                    return status, total
                log.info("%s: connection closed at %d of %d bytes", url, part.stat().st_size, total)
            status = "resumed"
            time.sleep(RETRY_WAIT_S * 2**attempt)
        raise CxrError(
            f"{url}: download failed after {self.retries + 1} attempts; run again to resume"
        )

    def _transfer(self, url: str, part: Path, remote: Remote) -> int | None:
        """One request: append to `part` from its current size; return the full size if known."""
        have = _part_size(part)
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            response = urllib.request.urlopen(request, timeout=60)
        except urllib.error.HTTPError as error:
            if error.code != 416 or not have:
                raise
            if _content_range_total(error.headers.get("Content-Range")) == have:
                return have  # interrupted between the last byte and the rename
            part.unlink()  # the part is no prefix of this file: start over
            return self._transfer(url, part, remote)
        with response:
            if response.status == 206:
                mode, total = "ab", _content_range_total(response.headers.get("Content-Range"))
            else:
                if have:
                    log.info("%s: server ignores Range, restarting from zero", url)
                    self.bar.update(-have)
                part.unlink(missing_ok=True)  # the new one is created exclusively
                mode, have = "wb", 0
                length = response.headers.get("Content-Length")
                total = int(length) if length is not None else None
            self._count(remote, total)
            self._copy(response, part, mode)
        return total

    def _count(self, remote: Remote, total: int | None) -> None:
        """Add a size the table lacks to the bar's total, once, when the server first gives it."""
        with self._lock:
            if remote.size is None and total is not None and remote.name not in self._counted:
                self._counted.add(remote.name)
                self.bar.total += total
                self.bar.refresh()

    def _copy(self, response: http.client.HTTPResponse, part: Path, mode: str) -> None:
        with _open_part(part, mode) as f:
            while block := response.read(CHUNK):
                if self.stop.is_set():
                    raise _Stopped(part.name)
                try:
                    f.write(block)
                except OSError as error:
                    f.close()
                    raise CxrError(
                        f"{part}: cannot write ({error.strerror}); {part.name} is kept and the "
                        "next run resumes it"
                    ) from None
                self.bar.update(len(block))


def _content_range_total(header: str | None) -> int | None:
    """The total of `Content-Range: bytes a-b/total` (None for `*` or a missing header)."""
    if header is None or "/" not in header:
        return None
    total = header.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _find_local(folder: Path, remote: Remote) -> Path | None:
    """`remote` in an offline folder: its name, the plain form of a `.gz`, or NIH's 2-digit name."""
    names = [remote.name]
    if remote.is_archive:
        names.append(f"images_{int(_folder(remote)[-3:]):02d}.tar.gz")
    elif remote.name.endswith(".gz"):
        names.append(remote.name.removesuffix(".gz"))
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None
