"""``vitseg-lab data download|prepare|verify|status NAME``: get the papers' benchmarks into place.

- **download**: fetches each archive from its official address (mirrors after), resuming a
  partial ``.part`` file with an HTTP Range request, with a tqdm progress bar; checks the md5
  where one is recorded; renames atomically; unpacks into the official layout. Without network it
  stops at once with one sentence saying which file to fetch by hand and where to put it (an
  archive already in ``<root>/downloads/`` is checked and unpacked without any network).
- **prepare**: the conversions the papers' pipelines need (SBD ``.mat`` -> ``SegmentationClassAug``
  PNGs and ``train_aug.txt``; COCO-Stuff ``.mat`` -> ``*_labelTrainIds.png``; image links shared by
  RefCOCO and ZSI). Idempotent.
- **verify**: counts files per split against the official numbers, checks archive checksums,
  and decodes a sample through the real loaders; each problem names its path and what to do.
- **status**: a table of what is present, for the notebooks' full-scale cells.

The data root is ``--root``, else ``$VITSEG_DATA``, else ``data/`` (see ``data/README.md``).

Python API: :func:`download`, :func:`prepare`, :func:`verify`, :func:`status`,
:func:`format_status`, :func:`missing_message`, :func:`require`, :func:`download_file`.
CLI wiring: :func:`add_data_commands` (for ``vitseg_lab.cli``) and :func:`main`
(``python -m vitseg_lab.data.fetch status``).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import ENV_VAR, DataFormatError, DatasetNotFound, check_choice, data_root

__all__ = [
    "NAMES",
    "SPECS",
    "DownloadError",
    "NetworkUnavailable",
    "Remote",
    "Spec",
    "add_data_commands",
    "download",
    "download_file",
    "extract_archive",
    "file_md5",
    "format_status",
    "main",
    "missing_message",
    "prepare",
    "require",
    "status",
    "verify",
]

DOWNLOADS = "downloads"  # archives live in <root>/downloads/
DEFAULT_TIMEOUT = 15.0


class DownloadError(RuntimeError):
    """A download or an unpacking failed; the message says what to do."""


class NetworkUnavailable(DownloadError):
    """No address of a file could be reached (offline machine, firewall, DNS)."""


# Registry ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Remote:
    """One file to fetch.

    Attributes:
        filename: the archive's name in ``<root>/downloads/`` (or the file's name).
        urls: official address first, then mirrors.
        md5: the expected md5, or None where none could be obtained reliably offline.
        md5_source: where the md5 comes from.
        size: approximate size, for messages.
        extract_to: folder (relative to the root) to unpack into; None for a plain file.
        dest: for a plain file, its final path relative to the root.
        provides: paths relative to the root whose presence means the content is already in place.
        manual: instructions when no direct download exists (e.g. Google Drive folders).
    """

    filename: str
    urls: tuple[str, ...] = ()
    md5: str | None = None
    md5_source: str | None = None
    size: str = ""
    extract_to: str | None = "."
    dest: str | None = None
    provides: tuple[str, ...] = ()
    manual: str | None = None


@dataclass(frozen=True)
class Spec:
    """A data set ``vitseg-lab data`` knows: what to fetch and where it ends up."""

    name: str
    title: str
    chapter: str
    remotes: tuple[Remote, ...]
    folder: str  # main folder under the root, for messages
    notes: str = ""


_TV = "torchvision 0.29.1 torchvision/datasets/{} (the md5 torchvision's own download checks)"
# No md5 below except VOC and SBD: for the others no published checksum could be obtained
# offline when this was written, so `verify` says "no checksum recorded" for them.
VOC_TAR = Remote(
    "VOCtrainval_11-May-2012.tar",
    ("https://thor.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
     "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"),
    md5="6cd6e144f989b92b3379bac3b3de84fd", md5_source=_TV.format("voc.py"),
    size="about 2 GB", extract_to=".", provides=("VOCdevkit/VOC2012/JPEGImages",),
)
_SBD = "{}/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz"
SBD_TGZ = Remote(
    "benchmark.tgz",
    (
        _SBD.format("https://www2.eecs.berkeley.edu"),
        _SBD.format("http://www.eecs.berkeley.edu"),
    ),
    md5="82b4d87ceb2ed10f6038a1cba92111cb", md5_source=_TV.format("sbd.py"),
    size="about 1.4 GB", extract_to=".", provides=("benchmark_RELEASE/dataset/cls",),
)
ADE_ZIP = Remote(
    "ADEChallengeData2016.zip",
    ("http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",),
    size="about 0.9 GB", extract_to=".", provides=("ADEChallengeData2016/images",),
)
COCO_TRAIN = Remote(
    "train2014.zip", ("http://images.cocodataset.org/zips/train2014.zip",),
    size="about 13 GB", extract_to="coco",
    provides=("coco/train2014", "images/mscoco/images/train2014"),
)
COCO_VAL = Remote(
    "val2014.zip", ("http://images.cocodataset.org/zips/val2014.zip",),
    size="about 6 GB", extract_to="coco", provides=("coco/val2014",),
)
COCO_STUFF_ZIP = Remote(
    "cocostuff-10k-v1.1.zip",
    ("http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/cocostuff-10k-v1.1.zip",),
    size="about 2 GB", extract_to="coco_stuff10k",
    provides=("coco_stuff10k/imageLists", "coco_stuff10k/annotations/train2014"),
)
_REFER = "https://bvisionweb1.cs.unc.edu/licheng/referit/data/{}.zip"
# The UNC host is often down; other repositories use Wayback snapshots (METHODS §6.4).
_WAYBACK = "https://web.archive.org/web/20220413011718/" + _REFER


def _refer_zip(ds: str) -> Remote:
    return Remote(f"{ds}.zip", (_REFER.format(ds), _WAYBACK.format(ds)), size="tens of MB",
                  extract_to=".", provides=(f"{ds}/instances.json",))


_ZSI_REPO = "https://github.com/zhengye1995/Zero-shot-Instance-Segmentation"
_ZSI_DRIVE = "https://drive.google.com/drive/folders/1TLbmDoRiKcMGq1zyVahXtGVTdkvI9Dus"
ZSI_ANN_FILES = tuple(
    f"coco/annotations/instances_{part}_{s}.json"
    for s in ("48_17", "65_15")
    for part in ("train2014_seen", "val2014_seen", "val2014_unseen", "val2014_gzsi")
)
ZSI_ANNOTATIONS = Remote(
    "ZSI split annotations", extract_to=None, provides=ZSI_ANN_FILES,
    manual=(f"the ZSI split annotation JSONs are shared on Google Drive ({_ZSI_DRIVE}); download "
            "them in a browser and put the 8 instances_*_{48_17,65_15}.json files in "
            "<root>/coco/annotations/"),
)


def _w2v(split: str) -> Remote:
    name = f"word_w2v_withbg_{split}.txt"
    # The files sit in the ZSI repository's data/coco/ (METHODS §5.1); the branch name of this
    # raw address could not be checked offline, so a 404 falls back to the manual instruction.
    return Remote(
        name,
        (
            (
                "https://raw.githubusercontent.com/zhengye1995/Zero-shot-Instance-Segmentation/"
                f"master/data/coco/{name}"
            ),
        ),
        size="about 0.2 MB", extract_to=None, dest=f"coco/{name}", provides=(f"coco/{name}",),
        manual=f"copy data/coco/{name} from a clone of {_ZSI_REPO} to <root>/coco/{name}",
    )


SPECS: dict[str, Spec] = {
    "ade20k": Spec("ade20k", "ADE20K (SceneParsing)", "03", (ADE_ZIP,), "ADEChallengeData2016"),
    "voc": Spec("voc", "PASCAL VOC 2012 + SBD aug", "04", (VOC_TAR, SBD_TGZ), "VOCdevkit/VOC2012",
                notes="then `vitseg-lab data prepare voc` builds SegmentationClassAug/train_aug"),
    "refcoco": Spec("refcoco", "RefCOCO (unc)", "05", (_refer_zip("refcoco"), COCO_TRAIN),
                    "refcoco"),
    "refcoco+": Spec("refcoco+", "RefCOCO+ (unc)", "05", (_refer_zip("refcoco+"), COCO_TRAIN),
                     "refcoco+"),
    "refcocog": Spec("refcocog", "RefCOCOg (umd)", "05", (_refer_zip("refcocog"), COCO_TRAIN),
                     "refcocog"),
    "coco2014": Spec("coco2014", "COCO 2014 images", "05-06", (COCO_TRAIN, COCO_VAL), "coco"),
    "coco-zsi": Spec("coco-zsi", "COCO 2014 ZSI 48/17 + 65/15", "06",
                     (COCO_TRAIN, COCO_VAL, _w2v("48_17"), _w2v("65_15"), ZSI_ANNOTATIONS),
                     "coco"),
    "coco-stuff10k": Spec("coco-stuff10k", "COCO-Stuff-10K (optional)", "03",
                          (COCO_STUFF_ZIP,), "coco_stuff10k",
                          notes="then `vitseg-lab data prepare coco-stuff10k` converts the labels"),
}
NAMES: tuple[str, ...] = tuple(SPECS)


def _spec(name: str) -> Spec:
    return SPECS[check_choice(name, list(SPECS), "data set name (vitseg-lab data ... NAME)")]


def _names(names: Iterable[str] | None) -> list[str]:
    names = list(names or [])
    if not names or "all" in names:
        return list(NAMES)
    return [_spec(n).name for n in names]


# Download ----------------------------------------------------------------------------------------
def _progress(**kw: Any):
    from tqdm.auto import tqdm

    return tqdm(**kw)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} TB"


def file_md5(path: str | os.PathLike, progress: bool = False) -> str:
    """md5 of a file, read in 4 MB blocks (with a progress bar for large files)."""
    path = Path(path)
    h = hashlib.md5()
    size = path.stat().st_size
    with open(path, "rb") as f, _progress(total=size, unit="B", unit_scale=True,
                                          unit_divisor=1024, desc=f"md5 {path.name}",
                                          disable=not progress or size < (64 << 20),
                                          leave=False) as bar:
        for block in iter(lambda: f.read(4 << 20), b""):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def _cached_md5(path: Path, progress: bool = False) -> str:
    """md5 of an archive, remembered in ``.checksums.json`` beside it (keyed on size + mtime)."""
    cache_path = path.parent / ".checksums.json"
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    st = path.stat()
    key = f"{st.st_size}:{int(st.st_mtime)}"
    hit = cache.get(path.name)
    if isinstance(hit, dict) and hit.get("key") == key and "md5" in hit:
        return hit["md5"]
    digest = file_md5(path, progress)
    cache[path.name] = {"key": key, "md5": digest}
    try:
        tmp = cache_path.with_name(cache_path.name + ".tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, cache_path)
    except OSError:
        pass  # a read-only downloads folder only loses the cache
    return digest


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    md5: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool = True,
    chunk_size: int = 1 << 20,
) -> Path:
    """Download ``url`` to ``dest``: resumable, with a progress bar, checked, renamed atomically.

    Bytes go to ``dest.part``; an existing ``.part`` is resumed with ``Range: bytes=<size>-``
    (a server that ignores ranges makes it start over). When complete, the md5 is checked (if
    given) and the file renamed to ``dest``.

    Raises:
        NetworkUnavailable: the address cannot be reached (message: what to fetch by hand, where).
        DownloadError: HTTP error, interrupted transfer (resumable), or checksum mismatch.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "vitseg-lab (python urllib)"}
    if have:
        headers["Range"] = f"bytes={have}-"
    req = urllib.request.Request(url, headers=headers)
    complete = False
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            complete = True  # the range starts at the end: the .part file is already whole
        else:
            raise DownloadError(
                f"{url} answered HTTP {e.code} ({e.reason}); download it by hand (see "
                f"data/README.md) and put it at {dest}."
            ) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        host = urllib.parse.urlsplit(url).hostname
        raise NetworkUnavailable(
            f"Could not reach {host} ({reason}), so nothing was downloaded: fetch {url} by hand "
            f"(see data/README.md), put it at {dest}, and run the same command again to check and "
            "unpack it."
        ) from None

    if not complete:
        with resp:
            status = getattr(resp, "status", None) or resp.getcode()
            length = resp.headers.get("Content-Length")
            start = 0
            if have and status == 206:
                m = re.match(r"bytes\s+(\d+)-", resp.headers.get("Content-Range", ""))
                start = int(m.group(1)) if m else have
            if have and status == 206 and start != have:
                part.unlink()
                raise DownloadError(
                    f"{url} resumed {dest.name} at byte {start} instead of {have}; the partial "
                    "file was deleted: run the same command again to download it afresh."
                )
            if status != 206:
                have = 0  # the server ignored the range and sends the whole file: start over
            total = (int(length) + have) if length is not None else None
            mode = "ab" if have else "wb"
            try:
                with open(part, mode) as f, _progress(
                    total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=dest.name, disable=not progress, leave=False,
                ) as bar:
                    while True:
                        block = resp.read(chunk_size)
                        if not block:
                            break
                        f.write(block)
                        bar.update(len(block))
            except (TimeoutError, OSError, http.client.HTTPException) as e:
                got = part.stat().st_size if part.exists() else 0
                raise DownloadError(
                    f"the transfer of {dest.name} stopped after {_human(got)} ({e}); run the same "
                    f"command again to resume from {part}."
                ) from None
        got = part.stat().st_size
        if total is not None and got != total:
            raise DownloadError(
                f"the transfer of {dest.name} ended after {_human(got)} of {_human(total)}; run "
                f"the same command again to resume from {part}."
            )
    if md5 is not None:
        digest = file_md5(part, progress)
        if digest != md5:
            part.unlink()
            raise DownloadError(
                f"{dest.name} has md5 {digest}, not the recorded {md5}; the damaged download was "
                "deleted: run the same command again to fetch it afresh."
            )
    os.replace(part, dest)
    return dest


def _is_within(base: Path, target: Path) -> bool:
    try:
        target.resolve().relative_to(base.resolve())
        return True
    except ValueError:
        return False


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike,
                    progress: bool = True) -> None:
    """Unpack a .zip / .tar / .tgz / .tar.gz into ``dest``, refusing paths that leave it.

    Raises:
        DownloadError: the archive is truncated or not an archive (message: delete, fetch again).
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                members = z.infolist()
                for m in _progress(iterable=members, desc=f"unpack {archive.name}", unit="file",
                                   disable=not progress, leave=False):
                    if not _is_within(dest, dest / m.filename):
                        raise DownloadError(
                            f"{archive} contains the unsafe path {m.filename!r}; it is not the "
                            "official archive: delete it and download it again."
                        )
                    z.extract(m, dest)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as t:
                for m in _progress(iterable=t, desc=f"unpack {archive.name}", unit="file",
                                   disable=not progress, leave=False):
                    try:
                        t.extract(m, dest, filter="data")
                    except tarfile.FilterError as e:
                        raise DownloadError(
                            f"{archive} contains an unsafe entry ({e}); it is not the official "
                            "archive: delete it and download it again."
                        ) from None
        else:
            raise DownloadError(
                f"{archive} is not a zip or tar archive (an HTML error page saved by a browser?): "
                "delete it and download it again."
            )
    except (zipfile.BadZipFile, tarfile.ReadError, EOFError, zipfile.LargeZipFile) as e:
        raise DownloadError(
            f"{archive} is truncated or corrupt ({e}): delete it and download it again."
        ) from None


def _present(root: Path, rel: str) -> bool:
    p = root / rel
    if p.is_dir():
        with os.scandir(p) as it:
            return any(True for _ in it)
    return p.is_file() and p.stat().st_size > 0


def _provided(root: Path, r: Remote) -> bool:
    if not r.provides:
        return False
    if r.manual and r.extract_to is None and not r.urls:
        return all(_present(root, p) for p in r.provides)  # a set of files placed by hand
    return any(_present(root, p) for p in r.provides)


def _hoist(dest: Path, r: Remote, root: Path) -> None:
    """If an archive unpacked into a single extra top folder, move its contents up one level."""
    if _provided(root, r):
        return
    entries = [p for p in dest.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        inner = entries[0]
        for child in inner.iterdir():
            if not (dest / child.name).exists():
                shutil.move(str(child), str(dest / child.name))
        if not any(inner.iterdir()):
            inner.rmdir()


def fetch_remote(
    r: Remote, root: Path, *, force: bool = False, extract: bool = True,
    remove_archive: bool = False, timeout: float = DEFAULT_TIMEOUT, progress: bool = True,
    log: Callable[[str], None] = print,
) -> str | None:
    """Get one file into place. Returns a manual instruction if a step must be done by hand."""
    target = root / (r.dest if r.dest else Path(DOWNLOADS) / r.filename)
    marker = root / DOWNLOADS / f".{r.filename}.extracted"
    # In place, unless our own unpacking of a present archive never finished (no marker).
    unfinished = r.extract_to is not None and target.is_file() and not marker.exists()
    if not force and _provided(root, r) and not unfinished:
        log(f"  {r.filename}: already in place")
        return None
    if r.manual and not r.urls:
        return r.manual.replace("<root>", str(root))
    if force or not target.is_file():
        errors: list[DownloadError] = []
        for url in r.urls:
            try:
                log(f"  {r.filename}: downloading {url}" + (f" ({r.size})" if r.size else ""))
                download_file(url, target, md5=r.md5, timeout=timeout, progress=progress)
                break
            except NetworkUnavailable as e:
                errors.append(e)
            except DownloadError as e:
                if "HTTP" not in str(e):
                    raise
                errors.append(e)
        else:
            if r.manual and errors and not isinstance(errors[0], NetworkUnavailable):
                return r.manual.replace("<root>", str(root))
            raise errors[0]
    elif r.md5 is not None:
        digest = _cached_md5(target, progress)
        if digest != r.md5:
            raise DownloadError(
                f"{target} has md5 {digest}, not the recorded {r.md5} ({r.md5_source}); it is "
                "incomplete or damaged: delete it and run the same command again."
            )
        log(f"  {r.filename}: found in {target.parent}, md5 ok")
    else:
        log(f"  {r.filename}: found in {target.parent} (no checksum recorded)")
    if r.extract_to is not None and extract:
        dest = root / r.extract_to
        log(f"  {r.filename}: unpacking into {dest}")
        extract_archive(target, dest, progress)
        _hoist(dest, r, root)
        marker.write_text(r.md5 or "")
        if remove_archive:
            target.unlink()
    return None


def download(
    name: str, root: str | os.PathLike | None = None, *, force: bool = False,
    extract: bool = True, remove_archives: bool = False, timeout: float = DEFAULT_TIMEOUT,
    progress: bool = True, log: Callable[[str], None] = print,
) -> list[str]:
    """Fetch and unpack every file of data set ``name``.

    Returns:
        The manual steps still needed (empty when the download is complete).

    Raises:
        NetworkUnavailable: offline (one sentence: which file to fetch by hand and where).
        DownloadError: HTTP errors, interrupted transfers (resumable), bad checksums.
    """
    spec = _spec(name)
    root = data_root(root)
    root.mkdir(parents=True, exist_ok=True)
    log(f"{spec.title} -> {root}")
    manual = []
    for r in spec.remotes:
        step = fetch_remote(r, root, force=force, extract=extract,
                            remove_archive=remove_archives, timeout=timeout, progress=progress,
                            log=log)
        if step:
            manual.append(step)
    return manual


# Prepare -----------------------------------------------------------------------------------------
def _link(root: Path, link_rel: str, target_rel: str) -> str | None:
    link, target = root / link_rel, root / target_rel
    if link.exists() or link.is_symlink() or not target.is_dir():
        return None
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)
    except OSError as e:
        return f"could not link {link} -> {target} ({e}); pass image_dir= to the loader instead"
    return f"linked {link} -> {target}"


def prepare(name: str, root: str | os.PathLike | None = None, progress: bool = True) -> list[str]:
    """Run the conversions data set ``name`` needs. Idempotent. Returns what was done."""
    spec = _spec(name)
    root = data_root(root)
    if spec.name == "voc":
        from .voc import prepare_voc_aug

        return prepare_voc_aug(root, progress)
    if spec.name == "coco-stuff10k":
        from .coco_stuff import prepare_coco_stuff10k

        return prepare_coco_stuff10k(root, progress)
    lines = []
    if spec.name.startswith("refcoco"):
        msg = _link(root, "images/mscoco/images/train2014", "coco/train2014")
        lines.append(msg or "the COCO train2014 images are reachable; nothing to link")
    if spec.name in ("coco-zsi", "coco2014"):
        msg = _link(root, "coco/train2014", "images/mscoco/images/train2014")
        lines.append(msg or "nothing to link")
    return lines or [f"{spec.title} needs no preparation"]


# Verify ------------------------------------------------------------------------------------------
@dataclass
class Report:
    """What ``verify`` found: ``(level, message)`` lines, level in ok/info/warn/fail."""

    name: str
    lines: list[tuple[str, str]] = field(default_factory=list)

    def add(self, level: str, msg: str) -> None:
        self.lines.append((level, msg))

    @property
    def ok(self) -> bool:
        return not any(lv == "fail" for lv, _ in self.lines)

    @property
    def failures(self) -> list[str]:
        return [m for lv, m in self.lines if lv == "fail"]

    def __str__(self) -> str:
        tag = {"ok": "ok  ", "info": "    ", "warn": "WARN", "fail": "FAIL"}
        return "\n".join(f"[{tag[lv]}] {m}" for lv, m in self.lines)


# Official counts: (number, certain). Uncertain ones (remembered, not re-checked) only warn.
OFFICIAL: dict[str, dict[str, tuple[int, bool]]] = {
    "ade20k": {"training": (20210, True), "validation": (2000, True)},
    "voc": {"JPEGImages": (17125, True), "SegmentationClass": (2913, True),
            "train_aug": (10582, True), "train": (1464, True), "val": (1449, True)},
    "refcoco": {"train": (120624, False), "val": (10834, False), "testA": (5657, False),
                "testB": (5095, False)},
    "refcoco+": {"train": (120191, False), "val": (10758, False), "testA": (5726, False),
                 "testB": (4889, False)},
    "refcocog": {"train": (80512, False), "val": (4896, False), "test": (9602, False)},
    "coco2014": {"train2014": (82783, True), "val2014": (40504, True)},
    "coco-zsi": {},
    "coco-stuff10k": {"train": (9000, True), "test": (1000, True)},
}


def _count(folder: Path, suffix: str) -> int:
    if not folder.is_dir():
        return 0
    with os.scandir(folder) as it:
        return sum(1 for e in it if e.name.endswith(suffix))


def _scan(rep: Report, folder: Path, suffix: str) -> int:
    """Count ``*suffix`` files in ``folder`` and fail on every empty one (an interrupted copy)."""
    if not folder.is_dir():
        return 0
    n, empty = 0, []
    with os.scandir(folder) as it:
        for e in it:
            if e.name.endswith(suffix):
                n += 1
                if e.stat().st_size == 0:
                    empty.append(e.name)
    for name in empty[:20]:
        rep.add("fail", f"{folder / name} is empty (an interrupted copy or unpacking): delete it "
                        f"and run `vitseg-lab data download {rep.name} --force`, or copy it again")
    if len(empty) > 20:
        rep.add("fail", f"{len(empty) - 20} more empty files in {folder}")
    return n


def _check_count(rep: Report, what: str, found: int, key: str,
                 expected: dict[str, tuple[int, bool]]) -> None:
    if key not in expected:
        rep.add("info", f"{what}: {found:,}")
        return
    want, certain = expected[key]
    if found == want:
        rep.add("ok", f"{what}: {found:,} as expected")
    elif certain:
        rep.add("fail", f"{what}: found {found:,}, expected {want:,}; the download or unpacking "
                        f"is incomplete: run `vitseg-lab data download {rep.name}` again (and "
                        f"`vitseg-lab data prepare {rep.name}` where it applies)")
    else:
        rep.add("warn", f"{what}: found {found:,}; the number we recorded (from memory, not "
                        f"re-checked) is {want:,}")


def _picks(n: int, samples: int, full: bool) -> list[int]:
    if n <= 0:
        return []
    if full or samples >= n:
        return list(range(n))
    rng = random.Random(0)
    return sorted({0, n - 1, *rng.sample(range(n), max(0, samples - 2))})


def _decode(rep: Report, what: str, ds: Any, samples: int, full: bool, progress: bool) -> None:
    idx = _picks(len(ds), samples, full)
    bad = 0
    for i in _progress(iterable=idx, desc=f"decode {what}", disable=not progress or len(idx) < 50,
                       leave=False):
        try:
            ds[i]
        except (DataFormatError, DatasetNotFound, OSError, ValueError) as e:
            bad += 1
            rep.add("fail", str(e))
    if not bad:
        rep.add("ok", f"{what}: {len(idx)} sample{'s' if len(idx) != 1 else ''} decoded")


def _check_archives(rep: Report, spec: Spec, root: Path, progress: bool) -> None:
    for r in spec.remotes:
        if r.extract_to is None:
            continue
        path = root / DOWNLOADS / r.filename
        if not path.is_file():
            continue
        if r.md5 is None:
            rep.add("info", f"{path}: no checksum recorded (none could be obtained offline when "
                            "this was written)")
            continue
        digest = _cached_md5(path, progress)
        if digest == r.md5:
            rep.add("ok", f"{path}: md5 {digest} matches ({r.md5_source})")
        else:
            rep.add("fail", f"{path}: md5 {digest} is not the recorded {r.md5}; the archive is "
                            "damaged: delete it and run `vitseg-lab data download "
                            f"{spec.name}` again")


def _loader_try(rep: Report, make: Callable[[], Any]) -> Any:
    try:
        return make()
    except (DataFormatError, DatasetNotFound, ValueError) as e:
        rep.add("fail", str(e))
        return None


def _verify_ade(rep, root, exp, samples, full, progress):
    from .ade20k import ADE20K, FOLDER

    base = root / FOLDER
    if not base.is_dir():
        rep.add("fail", f"{base} is missing: run `vitseg-lab data download ade20k`")
        return
    for split in ("training", "validation"):
        n_img = _scan(rep, base / "images" / split, ".jpg")
        n_ann = _scan(rep, base / "annotations" / split, ".png")
        _check_count(rep, f"images/{split}", n_img, split, exp)
        _check_count(rep, f"annotations/{split}", n_ann, split, exp)
        ds = _loader_try(rep, lambda s=split: ADE20K(root, s))
        if ds is not None:
            _decode(rep, f"ADE20K {split}", ds, samples, full, progress)


def _verify_voc(rep, root, exp, samples, full, progress):
    from .voc import FOLDER, VOCAug

    base = root / FOLDER
    if not base.is_dir():
        rep.add("fail", f"{base} is missing: run `vitseg-lab data download voc`")
        return
    _check_count(rep, "JPEGImages", _scan(rep, base / "JPEGImages", ".jpg"), "JPEGImages", exp)
    _check_count(rep, "SegmentationClass", _scan(rep, base / "SegmentationClass", ".png"),
                 "SegmentationClass", exp)
    sets = base / "ImageSets" / "Segmentation"
    for split in ("train", "val", "train_aug"):
        lst = sets / f"{split}.txt"
        if not lst.is_file():
            how = ("run `vitseg-lab data prepare voc`" if split == "train_aug"
                   else "unpack the VOC tar again (`vitseg-lab data download voc`)")
            rep.add("fail", f"{lst} is missing: {how}")
            continue
        n = sum(1 for ln in lst.read_text().splitlines() if ln.strip())
        _check_count(rep, f"{split}.txt", n, split, exp)
    for split in ("train_aug", "val"):
        if not (sets / f"{split}.txt").is_file():
            continue
        ds = _loader_try(rep, lambda s=split: VOCAug(root, s))
        if ds is not None:
            _decode(rep, f"VOC {split}", ds, samples, full, progress)


def _verify_refer(rep, root, exp, samples, full, progress, dataset):
    from .refcoco import DEFAULT_SPLIT_BY, RefCOCO, load_refs

    folder = root / dataset
    refs_path = folder / f"refs({DEFAULT_SPLIT_BY[dataset]}).p"
    if not refs_path.is_file() or not (folder / "instances.json").is_file():
        rep.add("fail", f"{refs_path} or {folder / 'instances.json'} is missing: run "
                        f"`vitseg-lab data download {dataset}`")
        return
    try:
        refs = load_refs(refs_path)
    except (DataFormatError, DatasetNotFound) as e:
        rep.add("fail", str(e))
        return
    counts: dict[str, int] = {}
    for r in refs:
        if isinstance(r, dict):
            counts[r.get("split", "?")] = counts.get(r.get("split", "?"), 0) + len(
                r.get("sentences", []))
    for split in sorted(counts):
        _check_count(rep, f"{dataset} {split} expressions", counts[split], split, exp)
    for split in sorted(counts):
        ds = _loader_try(rep, lambda s=split: RefCOCO(root, dataset, s))
        if ds is None:
            break
        missing = [i for i in {r["image_id"] for r in ds.refs} if not ds.image_path(i).is_file()]
        if missing:
            rep.add("fail", f"{len(missing)} images of {dataset} {split} are missing from "
                            f"{ds.image_dir} (first: {ds.image_path(missing[0]).name}): run "
                            "`vitseg-lab data download coco2014`")
        _decode(rep, f"{dataset} {split}", ds, samples, full, progress)


def _verify_coco(rep, root, exp, samples, full, progress):
    from .common import read_image

    for folder in ("train2014", "val2014"):
        d = root / "coco" / folder
        if not d.is_dir() and folder == "train2014":
            d = root / "images" / "mscoco" / "images" / "train2014"
        if not d.is_dir():
            rep.add("fail", f"{root / 'coco' / folder} is missing: run "
                            "`vitseg-lab data download coco2014`")
            continue
        _scan(rep, d, ".jpg")
        names = sorted(n for n in os.listdir(d) if n.endswith(".jpg"))
        _check_count(rep, f"coco/{folder}", len(names), folder, exp)
        idx = _picks(len(names), samples, full)
        bad = 0
        for i in idx:
            try:
                read_image(d / names[i])
            except (DataFormatError, DatasetNotFound) as e:
                bad += 1
                rep.add("fail", str(e))
        if idx and not bad:
            rep.add("ok", f"coco/{folder}: {len(idx)} images decoded")


def _verify_zsi(rep, root, exp, samples, full, progress):
    from .coco_zsi import ANN_FILES, COCOZeroShot, load_word_vectors, zsi_split

    for split in ("48_17", "65_15"):
        sp = zsi_split(split)
        w2v = root / "coco" / f"word_w2v_withbg_{split}.txt"
        try:
            load_word_vectors(w2v, len(sp.class_names))
            rep.add("ok", f"{w2v.name}: 300 x {1 + len(sp.class_names)} as expected")
        except (DataFormatError, DatasetNotFound) as e:
            rep.add("fail", str(e))
        for subset, (_, pattern) in ANN_FILES.items():
            path = root / "coco" / "annotations" / pattern.format(split=split)
            if not path.is_file():
                how = (ZSI_ANNOTATIONS.manual or "").replace("<root>", str(root))
                rep.add("fail", f"{path} is missing: {how}")
                continue
            ds = _loader_try(rep, lambda s=subset, sp=split: COCOZeroShot(root, sp, s))
            if ds is None:
                continue
            missing = [i for i in ds.image_ids if not ds.image_path(i).is_file()]
            if missing:
                rep.add("fail", f"{len(missing)} images of {path.name} are missing from "
                                f"{ds.image_dir} (first: {ds.image_path(missing[0]).name}): run "
                                "`vitseg-lab data download coco2014`")
            rep.add("info", f"{path.name}: {len(ds):,} images, "
                            f"{sum(len(v) for v in ds.anns_by_image.values()):,} instances")
            if not missing:
                _decode(rep, f"ZSI {split} {subset}", ds, samples, full, progress)


def _verify_stuff(rep, root, exp, samples, full, progress):
    from .coco_stuff import FOLDER, SPLITS, COCOStuff10K

    base = root / FOLDER
    if not base.is_dir():
        rep.add("fail", f"{base} is missing: run `vitseg-lab data download coco-stuff10k`")
        return
    for split, sub in SPLITS.items():
        lst = base / "imageLists" / f"{split}.txt"
        if lst.is_file():
            n = sum(1 for ln in lst.read_text().splitlines() if ln.strip())
            _check_count(rep, f"imageLists/{split}.txt", n, split, exp)
        n_img = _scan(rep, base / "images" / sub, ".jpg")
        _check_count(rep, f"images/{sub}", n_img, split, exp)
        _scan(rep, base / "annotations" / sub, ".png")
        ds = _loader_try(rep, lambda s=split: COCOStuff10K(root, s))
        if ds is not None:
            _decode(rep, f"COCO-Stuff-10K {split}", ds, samples, full, progress)


_VERIFIERS: dict[str, Callable[..., None]] = {
    "ade20k": _verify_ade,
    "voc": _verify_voc,
    "refcoco": lambda *a: _verify_refer(*a, dataset="refcoco"),
    "refcoco+": lambda *a: _verify_refer(*a, dataset="refcoco+"),
    "refcocog": lambda *a: _verify_refer(*a, dataset="refcocog"),
    "coco2014": _verify_coco,
    "coco-zsi": _verify_zsi,
    "coco-stuff10k": _verify_stuff,
}


def verify(
    name: str, root: str | os.PathLike | None = None, *, samples: int = 8, full: bool = False,
    expected: dict[str, int] | None = None, progress: bool = False,
) -> Report:
    """Check data set ``name``: counts per split, archive checksums, decoding of a sample.

    Args:
        samples: how many items per split to decode through the loader (first, last, random).
        full: decode every item (slow; finds every corrupt file).
        expected: counts to compare with instead of the official ones (fixtures, subsets).
    """
    spec = _spec(name)
    root = data_root(root)
    rep = Report(spec.name)
    exp = ({k: (v, True) for k, v in expected.items()} if expected is not None
           else OFFICIAL[spec.name])
    _check_archives(rep, spec, root, progress)
    _VERIFIERS[spec.name](rep, root, exp, samples, full, progress)
    return rep


# Status ------------------------------------------------------------------------------------------
@dataclass
class Status:
    """One row of the status table."""

    name: str
    title: str
    chapter: str
    state: str  # ready | prepare | incomplete | missing
    detail: str
    where: Path
    next_step: str = ""


def _status_one(spec: Spec, root: Path) -> Status:
    def row(state: str, detail: str, nxt: str = "", where: Path | None = None) -> Status:
        return Status(spec.name, spec.title, spec.chapter, state, detail,
                      where or root / spec.folder, nxt)

    dl = f"vitseg-lab data download {spec.name}"
    prep = f"vitseg-lab data prepare {spec.name}"
    n = spec.name
    if n == "ade20k":
        base = root / "ADEChallengeData2016"
        tr, va = _count(base / "images" / "training", ".jpg"), _count(
            base / "images" / "validation", ".jpg")
        if not base.exists():
            return row("missing", "", dl)
        if tr and va:
            return row("ready", f"training {tr:,} · validation {va:,}")
        return row("incomplete", f"training {tr:,} · validation {va:,}", dl)
    if n == "voc":
        base = root / "VOCdevkit" / "VOC2012"
        if not (base / "JPEGImages").is_dir():
            return row("missing", "", dl)
        lst = base / "ImageSets" / "Segmentation" / "train_aug.txt"
        if lst.is_file() and (base / "SegmentationClassAug").is_dir():
            k = sum(1 for ln in lst.read_text().splitlines() if ln.strip())
            return row("ready", f"train_aug {k:,} · JPEGImages "
                                f"{_count(base / 'JPEGImages', '.jpg'):,}")
        if (root / "benchmark_RELEASE").is_dir() or (base / "SegmentationClassAug").is_dir():
            return row("prepare", "train_aug not built yet", prep)
        return row("incomplete", "SBD (benchmark_RELEASE) missing", dl)
    if n.startswith("refcoco"):
        from .common import REFER_DEFAULT_SPLIT_BY as DEFAULT_SPLIT_BY
        from .common import refer_image_dirs as image_dirs

        folder = root / n
        refs = folder / f"refs({DEFAULT_SPLIT_BY[n]}).p"
        if not refs.is_file():
            return row("missing", "", dl)
        if not any(d.is_dir() for d in image_dirs(root, n)):
            return row("incomplete", "COCO train2014 images missing",
                       "vitseg-lab data download coco2014")
        return row("ready", f"{refs.name} · instances.json")
    if n == "coco2014":
        tr = max(_count(root / "coco" / "train2014", ".jpg"),
                 _count(root / "images" / "mscoco" / "images" / "train2014", ".jpg"))
        va = _count(root / "coco" / "val2014", ".jpg")
        if not tr and not va:
            return row("missing", "", dl)
        state = "ready" if tr and va else "incomplete"
        return row(state, f"train2014 {tr:,} · val2014 {va:,}", "" if state == "ready" else dl)
    if n == "coco-zsi":
        missing_ann = [p for p in ZSI_ANN_FILES if not (root / p).is_file()]
        w2v = [f"coco/word_w2v_withbg_{s}.txt" for s in ("48_17", "65_15")]
        missing_w2v = [p for p in w2v if not (root / p).is_file()]
        imgs = (root / "coco" / "train2014").is_dir() and (root / "coco" / "val2014").is_dir()
        if len(missing_ann) == len(ZSI_ANN_FILES) and len(missing_w2v) == 2 and not imgs:
            return row("missing", "", dl)
        parts = []
        if missing_ann:
            parts.append(f"{len(missing_ann)} of 8 split JSONs missing")
        if missing_w2v:
            parts.append(f"{len(missing_w2v)} word-vector files missing")
        if not imgs:
            parts.append("COCO images missing")
        if parts:
            return row("incomplete", "; ".join(parts), dl)
        return row("ready", "48/17 + 65/15 splits · word vectors · images")
    if n == "coco-stuff10k":
        base = root / "coco_stuff10k"
        if (base / "annotations" / "train2014").is_dir():
            tr = _count(base / "annotations" / "train2014", ".png")
            te = _count(base / "annotations" / "test2014", ".png")
            return row("ready", f"train {tr:,} · test {te:,}")
        if (base / "imageLists").is_dir():
            return row("prepare", "labels not converted yet", prep)
        return row("missing", "", dl)
    return row("missing", "", dl)


def status(names: Iterable[str] | None = None, root: str | os.PathLike | None = None,
           ) -> list[Status]:
    """One :class:`Status` per data set (all by default): cheap checks, no decoding."""
    root = data_root(root)
    return [_status_one(SPECS[n], root) for n in _names(names)]


def format_status(rows: Sequence[Status], root: str | os.PathLike | None = None) -> str:
    """The status rows as a plain-text table (what ``vitseg-lab data status`` prints)."""
    root = data_root(root)
    head = ("data set", "ch", "state", "what is there", "next step")
    body = [(r.name, r.chapter, r.state, r.detail or "-", r.next_step or "-") for r in rows]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [f"data root: {root}  (choose it with --root or ${ENV_VAR}; see data/README.md)",
             fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*b) for b in body]
    return "\n".join(lines)


def missing_message(name: str, root: str | os.PathLike | None = None) -> str | None:
    """One line for a notebook's full-scale cell, or None if data set ``name`` is ready."""
    s = status([name], root)[0]
    if s.state == "ready":
        return None
    size = ", ".join(r.size for r in SPECS[s.name].remotes if r.size)
    what = {"missing": "is not", "incomplete": "is incomplete", "prepare": "is not prepared"}
    return (f"{s.title} {what.get(s.state, 'is not ready')} in {data_root(root)}"
            f"{f' ({s.detail})' if s.detail else ''}: run `{s.next_step}`"
            f"{f' ({size})' if s.state == 'missing' and size else ''}, or set {ENV_VAR} to the "
            "folder that holds it (data/README.md).")


def require(name: str, root: str | os.PathLike | None = None) -> None:
    """Raise :class:`DatasetNotFound` with :func:`missing_message` unless ``name`` is ready."""
    msg = missing_message(name, root)
    if msg:
        raise DatasetNotFound(msg)


# CLI ---------------------------------------------------------------------------------------------
def _name_arg(value: str) -> str:
    if value == "all":
        return value
    try:
        return _spec(value).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _run(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (DownloadError, DatasetNotFound, DataFormatError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted; run the same command again to resume.", file=sys.stderr)
            return 130

    handler.__name__ = fn.__name__
    handler.__doc__ = fn.__doc__
    return handler


@_run
def cmd_download(args: argparse.Namespace) -> int:
    """Handler of ``data download``."""
    pending = []
    for n in _names(args.names):
        pending += download(n, args.root, force=args.force, extract=not args.no_extract,
                            remove_archives=args.remove_archives, timeout=args.timeout,
                            progress=not args.quiet)
    for step in dict.fromkeys(pending):
        print(f"manual step needed: {step}", file=sys.stderr)
    if not pending:
        print("done; next: `vitseg-lab data prepare NAME` where the status table says so, then "
              "`vitseg-lab data verify NAME`.")
    return 1 if pending else 0


@_run
def cmd_prepare(args: argparse.Namespace) -> int:
    """Handler of ``data prepare``."""
    for n in _names(args.names):
        print(f"{SPECS[n].title}:")
        for line in prepare(n, args.root, progress=not args.quiet):
            print(f"  {line}")
    return 0


@_run
def cmd_verify(args: argparse.Namespace) -> int:
    """Handler of ``data verify``."""
    ok = True
    for n in _names(args.names):
        rep = verify(n, args.root, samples=args.samples, full=args.full,
                     progress=not args.quiet)
        print(f"{SPECS[n].title}:")
        print(str(rep))
        ok &= rep.ok
    return 0 if ok else 1


@_run
def cmd_status(args: argparse.Namespace) -> int:
    """Handler of ``data status``."""
    print(format_status(status(args.names, args.root), args.root))
    return 0


def _add_actions(sub: Any) -> None:
    names = ", ".join(NAMES)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default=None,
                        help=f"data folder (default: ${ENV_VAR}, else data/ in the repository)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("download", parents=[common], help="fetch, check and unpack archives",
                       description=f"Fetch NAME ({names} or all) from the official addresses.")
    p.add_argument("names", nargs="+", type=_name_arg, metavar="NAME")
    p.add_argument("--force", action="store_true", help="fetch and unpack even if present")
    p.add_argument("--no-extract", action="store_true", help="only download the archives")
    p.add_argument("--remove-archives", action="store_true",
                   help="delete each archive once unpacked")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help="seconds to wait for a server (default %(default)s)")
    p.set_defaults(func=cmd_download, data_command="download")

    p = sub.add_parser("prepare", parents=[common], help="convert into the papers' layouts",
                       description="Run the conversions NAME needs (idempotent).")
    p.add_argument("names", nargs="+", type=_name_arg, metavar="NAME")
    p.set_defaults(func=cmd_prepare, data_command="prepare")

    p = sub.add_parser("verify", parents=[common], help="count files and decode a sample",
                       description="Count files per split, check checksums, decode a sample.")
    p.add_argument("names", nargs="+", type=_name_arg, metavar="NAME")
    p.add_argument("--samples", type=int, default=8, help="items decoded per split")
    p.add_argument("--full", action="store_true", help="decode every item (slow)")
    p.set_defaults(func=cmd_verify, data_command="verify")

    p = sub.add_parser("status", parents=[common], help="table of what is present",
                       description="Print what is present under the data root.")
    p.add_argument("names", nargs="*", type=_name_arg, metavar="NAME")
    p.set_defaults(func=cmd_status, data_command="status")


def add_data_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``data download|prepare|verify|status`` on a CLI's sub-parsers.

    Each leaf parser sets ``func`` (call ``args.func(args)``; it returns the exit code) and
    ``data_command``.

    Returns:
        The ``data`` parser.
    """
    p = subparsers.add_parser(
        "data", help="download, prepare, verify the benchmarks; show their status",
        description="Get the papers' benchmarks into the official layouts (see data/README.md).",
    )
    sub = p.add_subparsers(dest="data_command", metavar="{download,prepare,verify,status}")
    sub.required = True
    _add_actions(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vitseg_lab.data.fetch download|prepare|verify|status ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m vitseg_lab.data.fetch",
        description="Get the papers' benchmarks into the official layouts (see data/README.md).",
    )
    sub = parser.add_subparsers(dest="data_command", metavar="{download,prepare,verify,status}")
    sub.required = True
    _add_actions(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
