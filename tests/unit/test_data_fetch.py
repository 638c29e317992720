"""`vitseg-lab data`: downloads (offline failure, Range resume against a local server, checksums,
atomic rename), unpacking, prepare, verify, status and the CLI wiring. No test touches the
network: urlopen is patched to fail, or points at 127.0.0.1."""

from __future__ import annotations

import argparse
import hashlib
import http.server
import io
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from vitseg_lab.data import fetch, fixtures
from vitseg_lab.data.common import DatasetNotFound
from vitseg_lab.data.fetch import DownloadError, NetworkUnavailable, Remote, download_file

PAYLOAD = bytes((i * 7 + i // 256) % 256 for i in range(300_000))
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


# A small Range-aware HTTP server on 127.0.0.1 ----------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):  # keep pytest output clean
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append(dict(self.headers))
        if self.path.startswith("/missing"):
            self.send_error(404, "Not Found")
            return
        data, start = srv.payload, 0
        rng = self.headers.get("Range")
        m = re.match(r"bytes=(\d+)-", rng or "")
        if m and srv.honour_range:
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut_after is not None:  # drop the connection mid-transfer
            self.wfile.write(body[: srv.cut_after])
            self.wfile.flush()
            srv.sent.append(srv.cut_after)
            srv.cut_after = None
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)
        srv.sent.append(len(body))


@pytest.fixture()
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.payload, srv.honour_range, srv.cut_after = PAYLOAD, True, None
    srv.requests, srv.sent = [], []
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture()
def offline(monkeypatch):
    calls = []

    def refuse(*a, **k):
        calls.append(a[0])
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return calls


# download_file -----------------------------------------------------------------------------------
def test_fresh_download_checks_md5_and_renames(server, tmp_path):
    dest = tmp_path / "d" / "file.bin"
    download_file(server.url + "/file.bin", dest, md5=PAYLOAD_MD5, timeout=5, progress=False)
    assert dest.read_bytes() == PAYLOAD and not dest.with_name("file.bin.part").exists()


def test_resume_sends_range_and_fetches_only_the_rest(server, tmp_path):
    dest = tmp_path / "file.bin"
    dest.with_name("file.bin.part").write_bytes(PAYLOAD[:100_000])
    download_file(server.url + "/file.bin", dest, md5=PAYLOAD_MD5, timeout=5, progress=False)
    assert server.requests[-1].get("Range") == "bytes=100000-"
    assert server.sent == [200_000] and dest.read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.honour_range = False
    dest = tmp_path / "file.bin"
    dest.with_name("file.bin.part").write_bytes(b"x" * 5000)
    download_file(server.url + "/file.bin", dest, md5=PAYLOAD_MD5, timeout=5, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_part_already_complete_gets_416(server, tmp_path):
    dest = tmp_path / "file.bin"
    dest.with_name("file.bin.part").write_bytes(PAYLOAD)
    download_file(server.url + "/file.bin", dest, md5=PAYLOAD_MD5, timeout=5, progress=False)
    assert dest.read_bytes() == PAYLOAD and server.sent == []


def test_interrupted_transfer_resumes_on_next_call(server, tmp_path):
    dest = tmp_path / "file.bin"
    server.cut_after = 120_000
    with pytest.raises(DownloadError, match="run the same command again to resume"):
        download_file(server.url + "/file.bin", dest, md5=PAYLOAD_MD5, timeout=5, progress=False)
    part = dest.with_name("file.bin.part")
    assert part.stat().st_size == 120_000 and not dest.exists()
    download_file(server.url + "/file.bin", dest, md5=PAYLOAD_MD5, timeout=5, progress=False)
    assert dest.read_bytes() == PAYLOAD and server.requests[-1]["Range"] == "bytes=120000-"


def test_checksum_mismatch_deletes_and_says_so(server, tmp_path):
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError, match="not the recorded 0{32}.*deleted"):
        download_file(server.url + "/file.bin", dest, md5="0" * 32, timeout=5, progress=False)
    assert not dest.exists() and not dest.with_name("file.bin.part").exists()


def test_http_error_is_one_sentence(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404.*by hand.*put it at"):
        download_file(server.url + "/missing.zip", tmp_path / "m.zip", timeout=5, progress=False)


def test_offline_fails_at_once_with_where_to_put_files(offline, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(NetworkUnavailable) as e:
        fetch.download("ade20k", tmp_path, progress=False, log=lambda s: None)
    assert time.monotonic() - t0 < 2.0
    msg = str(e.value)
    assert "data.csail.mit.edu" in msg and "ADEChallengeData2016.zip" in msg and "by hand" in msg
    assert str(tmp_path / "downloads" / "ADEChallengeData2016.zip") in msg
    assert msg.count(". ") == 0  # one sentence
    assert len(offline) == 1  # no retry storm


def test_offline_cli_exit_code_and_message(offline, tmp_path, capsys):
    assert fetch.main(["download", "voc", "--root", str(tmp_path), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: Could not reach")
    assert "VOCtrainval_11-May-2012.tar" in err[0]
    assert len(offline) == 2  # the official address and torchvision's mirror, nothing else


# Unpacking and archives placed by hand -----------------------------------------------------------
def _zip_dir(src: Path, out: Path, top: str) -> None:
    with zipfile.ZipFile(out, "w") as z:
        for p in sorted((src / top).rglob("*")):
            z.write(p, p.relative_to(src))


def test_archive_placed_by_hand_is_unpacked_offline(offline, tmp_path):
    src = fixtures.make_ade20k(tmp_path / "src")
    root = tmp_path / "root"
    (root / "downloads").mkdir(parents=True)
    _zip_dir(src, root / "downloads" / "ADEChallengeData2016.zip", "ADEChallengeData2016")
    logs = []
    assert fetch.download("ade20k", root, progress=False, log=logs.append) == []
    assert offline == [] and any("no checksum recorded" in ln for ln in logs)
    from vitseg_lab.data.ade20k import ADE20K

    assert len(ADE20K(root, "training")) == 3
    assert (root / "downloads" / ".ADEChallengeData2016.zip.extracted").is_file()
    logs.clear()
    fetch.download("ade20k", root, progress=False, log=logs.append)
    assert any("already in place" in ln for ln in logs)


def test_recorded_md5_is_checked_for_archives_placed_by_hand(offline, tmp_path):
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "VOCtrainval_11-May-2012.tar").write_bytes(b"not the tar")
    with pytest.raises(DownloadError, match="not the recorded 6cd6e144f989b92b3379bac3b3de84fd"):
        fetch.download("voc", tmp_path, progress=False, log=lambda s: None)


def test_unsafe_and_truncated_archives(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as t:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 3
        t.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(DownloadError, match="unsafe"):
        fetch.extract_archive(evil, tmp_path / "out", progress=False)
    assert not (tmp_path / "escape.txt").exists()
    z = tmp_path / "t.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a/b.txt", "x" * 5000)
    z.write_bytes(z.read_bytes()[:60])
    with pytest.raises(DownloadError, match="delete it and download it again"):
        fetch.extract_archive(z, tmp_path / "out2", progress=False)


def test_single_top_folder_is_hoisted(tmp_path):
    src = fixtures.make_coco_stuff10k(tmp_path / "src")
    root = tmp_path / "root"
    (root / "downloads").mkdir(parents=True)
    arc = root / "downloads" / "cocostuff-10k-v1.1.zip"
    with zipfile.ZipFile(arc, "w") as z:  # an archive with an extra top folder
        for p in sorted((src / "coco_stuff10k").rglob("*")):
            z.write(p, Path("cocostuff-10k-v1.1") / p.relative_to(src / "coco_stuff10k"))
    fetch.download("coco-stuff10k", root, progress=False, log=lambda s: None)
    assert (root / "coco_stuff10k" / "imageLists" / "train.txt").is_file()


def test_manual_fallback_on_http_error(server, tmp_path):
    r = Remote("w.txt", (server.url + "/missing/w.txt",), extract_to=None, dest="coco/w.txt",
               provides=("coco/w.txt",), manual="copy w.txt to <root>/coco/w.txt")
    step = fetch.fetch_remote(r, tmp_path, progress=False, log=lambda s: None)
    assert step == f"copy w.txt to {tmp_path}/coco/w.txt"
    r2 = Remote("w.txt", (server.url + "/w.txt",), extract_to=None, dest="coco/w.txt",
                provides=("coco/w.txt",))
    assert fetch.fetch_remote(r2, tmp_path, progress=False, log=lambda s: None) is None
    assert (tmp_path / "coco" / "w.txt").read_bytes() == PAYLOAD


def test_recorded_checksums_come_from_torchvision():
    import torchvision.datasets.sbd as tv_sbd
    import torchvision.datasets.voc as tv_voc

    assert tv_voc.DATASET_YEAR_DICT["2012"]["md5"] == fetch.VOC_TAR.md5
    assert tv_sbd.SBDataset.md5 == fetch.SBD_TGZ.md5
    recorded = {r.filename for s in fetch.SPECS.values() for r in s.remotes if r.md5}
    assert recorded == {"VOCtrainval_11-May-2012.tar", "benchmark.tgz"}


# prepare / verify / status on the fixtures -------------------------------------------------------
@pytest.fixture(scope="module")
def everything(tmp_path_factory):
    return fixtures.make_all(tmp_path_factory.mktemp("all"))


def test_status_before_and_after_prepare(everything, tmp_path):
    rows = {r.name: r for r in fetch.status(root=everything)}
    assert rows["voc"].state == "prepare" and rows["coco-stuff10k"].state == "prepare"
    assert rows["ade20k"].state == "ready" and rows["refcoco"].state == "ready"
    assert rows["coco-zsi"].state == "ready" and rows["coco2014"].state == "ready"
    assert fetch.missing_message("ade20k", everything) is None
    msg = fetch.missing_message("voc", everything)
    assert "vitseg-lab data prepare voc" in msg and "\n" not in msg
    for n in ("voc", "coco-stuff10k", "refcoco"):
        assert fetch.prepare(n, everything, progress=False)
    assert all(r.state == "ready" for r in fetch.status(root=everything))
    empty = fetch.status(root=tmp_path)
    assert {r.state for r in empty} == {"missing"}
    table = fetch.format_status(empty, tmp_path)
    for n in fetch.NAMES:
        assert n in table
    with pytest.raises(DatasetNotFound, match="vitseg-lab data download refcocog"):
        fetch.require("refcocog", tmp_path)


@pytest.mark.parametrize("name", fetch.NAMES)
def test_verify_fixture_against_its_counts(everything, name):
    for n in ("voc", "coco-stuff10k"):
        fetch.prepare(n, everything, progress=False)
    rep = fetch.verify(name, everything, expected=fixtures.COUNTS[name], samples=3)
    assert rep.ok, str(rep)
    assert any(lv == "ok" for lv, _ in rep.lines)


def test_verify_against_official_counts(everything):
    rep = fetch.verify("ade20k", everything)
    assert not rep.ok and any("expected 20,210" in m for m in rep.failures)
    ref = fetch.verify("refcoco", everything)
    assert ref.ok and any(lv == "warn" and "from memory" in m for lv, m in ref.lines)


def test_verify_names_corrupt_and_missing_files(tmp_path):
    root = fixtures.make_ade20k(tmp_path)
    bad = root / "ADEChallengeData2016" / "images" / "validation" / "ADE_val_00000002.jpg"
    bad.write_bytes(bad.read_bytes()[:40])
    rep = fetch.verify("ade20k", root, expected=fixtures.COUNTS["ade20k"], full=True)
    assert not rep.ok and any(str(bad) in m and "corrupt or truncated" in m for m in rep.failures)
    (root / "ADEChallengeData2016" / "annotations" / "training" / "ADE_train_00000003.png").unlink()
    rep = fetch.verify("ade20k", root, expected=fixtures.COUNTS["ade20k"])
    assert any("ADE_train_00000003" in m for m in rep.failures)
    empty = root / "ADEChallengeData2016" / "images" / "training" / "ADE_train_00000001.jpg"
    empty.write_bytes(b"")
    rep = fetch.verify("ade20k", root, expected=fixtures.COUNTS["ade20k"], samples=0)
    assert any(str(empty) in m and "is empty" in m for m in rep.failures)
    rep = fetch.verify("voc", tmp_path)
    want = f"{tmp_path / 'VOCdevkit' / 'VOC2012'} is missing: run `vitseg-lab data download voc`"
    assert rep.failures == [want]


def test_verify_reports_archive_checksum(tmp_path):
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "benchmark.tgz").write_bytes(b"broken")
    rep = fetch.verify("voc", tmp_path)
    assert any("benchmark.tgz: md5" in m and "damaged" in m for m in rep.failures)


# CLI ---------------------------------------------------------------------------------------------
def test_cli_status_verify_prepare(everything, capsys):
    assert fetch.main(["status", "--root", str(everything)]) == 0
    out = capsys.readouterr().out
    assert "data root:" in out and "ade20k" in out and "ready" in out
    assert fetch.main(["verify", "ade20k", "--root", str(everything), "-q"]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert fetch.main(["prepare", "voc", "--root", str(everything), "-q"]) == 0
    assert "train_aug" in capsys.readouterr().out


def test_cli_unknown_name_suggests(capsys):
    with pytest.raises(SystemExit) as e:
        fetch.main(["verify", "refcoc"])
    assert e.value.code == 2 and "Did you mean 'refcoco'" in capsys.readouterr().err


def test_add_data_commands_plugs_into_a_cli(everything, capsys):
    parser = argparse.ArgumentParser(prog="vitseg-lab")
    sub = parser.add_subparsers(dest="command")
    fetch.add_data_commands(sub)
    args = parser.parse_args(["data", "status", "refcoco", "--root", str(everything)])
    assert args.command == "data" and args.data_command == "status"
    assert args.func(args) == 0 and "refcoco" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["data"])  # a data action is required


def test_module_runs_standalone(tmp_path):
    env = {**os.environ, "VITSEG_DATA": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "vitseg_lab.data.fetch", "status"], env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert str(tmp_path) in out.stdout and "missing" in out.stdout
