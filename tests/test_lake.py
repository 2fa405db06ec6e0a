"""The data lake against real storage: a local directory, a real XRootD server, a real WebDAV server (TLS)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import traceback
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from lake_servers import (
    LakeServer,
    free_port,
    put_from_child,
    webdav_server,
    webdav_token_server,
    xrootd_server,
)

from mqexec.errors import MQExecError
from mqexec.lake import Lake, LakeError, LakeRef, _Fsspec, cache_key, open_lake

__all__ = ["webdav_server", "webdav_token_server", "xrootd_server"]  # fixtures used by name below


@dataclass
class Site:
    """One lake for one test: its URL, the same directory on local disk, and how to open it."""

    url: str
    local: str
    server: LakeServer

    def lake(self) -> Lake:
        return Lake(self.url, **self.server.storage_options())

    def on_disk(self, ref: LakeRef) -> str:
        return os.path.join(self.local, ref.url[len(self.url) + 1 :])


@pytest.fixture(params=["file", "root", "davs"])
def site(request: pytest.FixtureRequest, tmp_path: Any) -> Site:
    sub = uuid.uuid4().hex[:12]
    if request.param == "file":
        server = LakeServer(f"file://{tmp_path}", str(tmp_path))
    elif request.param == "root":
        server = request.getfixturevalue("xrootd_server")
    else:
        server = request.getfixturevalue("webdav_server")
    return Site(f"{server.url}/{sub}", os.path.join(server.local_dir, sub), server)


def _flip_byte(path: str, offset: int = 3) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_round_trip(site: Site) -> None:
    lake = site.lake()
    data = os.urandom(100_000) + b"result"
    ref = lake.put(data)
    assert ref.size == len(data)
    assert ref.url == f"{site.url}/objects/{ref.sha256[:2]}/{ref.sha256}"
    assert LakeRef.from_dict(ref.to_dict()) == ref
    assert lake.get(LakeRef.from_dict(ref.to_dict())) == data
    with open(site.on_disk(ref), "rb") as f:
        assert f.read() == data
    # a second Lake on the same URL (another process, in real life) reads it too
    assert site.lake().get(ref) == data
    assert lake.get(lake.put(b"")) == b""


def test_put_is_idempotent(site: Site) -> None:
    lake = site.lake()
    ref = lake.put(b"same bytes")
    path = site.on_disk(ref)
    before = os.stat(path).st_mtime_ns
    assert lake.put(b"same bytes") == ref
    assert os.stat(path).st_mtime_ns == before  # not rewritten
    assert os.listdir(os.path.dirname(path)) == [ref.sha256]  # no temporary files left behind


def test_corruption_is_detected(site: Site) -> None:
    lake = site.lake()
    ref = lake.put(b"0123456789" * 100)
    _flip_byte(site.on_disk(ref))
    with pytest.raises(LakeError, match=r"corrupt.*sha256") as e:
        lake.get(ref)
    assert ref.url in str(e.value)
    with open(site.on_disk(ref), "r+b") as f:
        f.truncate(10)
    with pytest.raises(LakeError, match=r"corrupt.*size") as e:
        lake.get(ref)
    assert ref.url in str(e.value)


def test_missing_object_and_delete(site: Site) -> None:
    lake = site.lake()
    ref = lake.put(b"short-lived")
    lake.delete(ref)
    assert not os.path.exists(site.on_disk(ref))
    with pytest.raises(LakeError, match="missing object") as e:
        lake.get(ref)
    assert ref.url in str(e.value)
    assert lake.put(b"short-lived") == ref  # stored again, not skipped on a stale listing
    assert lake.get(ref) == b"short-lived"
    with pytest.raises(LakeError, match="not an object of the lake"):
        lake.get(LakeRef("file:///elsewhere/objects/aa/aa", 1, "aa"))


def test_cache_records(site: Site) -> None:
    lake = site.lake()
    key = cache_key("processor-sha", "file-uuid", "Events", 0, 200_000)
    assert lake.cache_get("agc-v1", key) is None
    assert lake.cache_list("agc-v1") == {} and lake.cache_namespaces() == []
    url = lake.cache_put("agc-v1", key, b"partial accumulator")
    assert url == f"{site.url}/cache/agc-v1/{key}" == lake.cache_url("agc-v1", key)
    assert lake.cache_get("agc-v1", key) == b"partial accumulator"
    lake.cache_put("agc-v1", key, b"rerun result")  # last writer wins
    assert lake.cache_get("agc-v1", key) == b"rerun result"
    lake.cache_put("agc-v1", "k" * 64, b"another")
    listed = lake.cache_list("agc-v1")  # one listing for the whole namespace
    assert set(listed) == {key, "k" * 64}
    assert listed[key].size == len(b"rerun result") + 71 and listed[key].mtime > 1.7e9
    assert lake.cache_namespaces() == ["agc-v1"]
    path = os.path.join(site.local, "cache", "agc-v1", key)
    assert sorted(os.listdir(os.path.dirname(path))) == sorted([key, "k" * 64])  # no temporary files
    _flip_byte(path, offset=-3 + os.path.getsize(path))
    with pytest.raises(LakeError, match="corrupt cache record") as e:
        lake.cache_get("agc-v1", key)
    assert e.value.kind == "corrupt" and f"{site.url}/cache/agc-v1/{key}" in str(e.value)
    lake.cache_remove("agc-v1", key)
    assert set(lake.cache_list("agc-v1")) == {"k" * 64}
    with pytest.raises(LakeError, match="bad cache name"):
        lake.cache_get("agc-v1", "../etc/passwd")
    with pytest.raises(LakeError, match="bad cache name"):
        lake.cache_list("../..")


def test_named_writes_are_atomic(site: Site) -> None:
    lake = site.lake()
    with lake.open_write("skims/a.parquet") as f:
        f.write(b"part 1, ")
        assert lake.size("skims/a.parquet") is None  # not visible while it is written
        f.write(b"part 2")
    assert f.url == f"{site.url}/skims/a.parquet"
    assert lake.read("skims/a.parquet") == b"part 1, part 2"
    with pytest.raises(ZeroDivisionError), lake.open_write("skims/b.parquet") as g:
        g.write(b"half")
        1 / 0  # noqa: B018 - the writer fails half-way
    assert lake.size("skims/b.parquet") is None
    assert [e.name for e in lake.listdir("skims")] == ["a.parquet"]  # the half-written file is gone
    assert lake.write("out/agc.coffea", b"v1") == f"{site.url}/out/agc.coffea"
    lake.write("out/agc.coffea", b"v2")  # replaced in place
    assert lake.read("out/agc.coffea") == b"v2"
    assert lake.listdir("nowhere") == []
    with pytest.raises(LakeError, match="missing object") as e:
        lake.read("nowhere/x")
    assert e.value.kind == "missing object"


def test_concurrent_puts_make_one_valid_object(site: Site) -> None:
    data = os.urandom(300_000)
    n = 4
    ctx = multiprocessing.get_context("spawn")  # the XRootD client's threads do not survive fork
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=put_from_child, args=(site.url, site.server, data, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in range(n)]
    for p in procs:
        p.join(30)
    assert all(isinstance(g, dict) for g in got), got
    refs = {LakeRef.from_dict(g) for g in got}
    assert len(refs) == 1
    (ref,) = refs
    assert os.listdir(os.path.dirname(site.on_disk(ref))) == [ref.sha256]
    assert site.lake().get(ref) == data


def test_webdav_wrong_password_names_url(webdav_server: LakeServer) -> None:
    opts = webdav_server.storage_options() | {"auth": ("lake", "wrong")}
    lake = Lake(webdav_server.url + "/auth", **opts)
    with pytest.raises(LakeError, match="authentication") as e:
        lake.put(b"x")
    assert webdav_server.url + "/auth/objects/" in str(e.value)
    assert isinstance(e.value, MQExecError) and e.value.kind == "authentication/permission refused"


def test_unreachable_server_names_url() -> None:
    url = f"davs://127.0.0.1:{free_port()}/lake"
    ref = LakeRef(url + "/objects/ab/abcd", 1, "abcd")
    with pytest.raises(LakeError, match="unreachable") as e:
        Lake(url).get(ref)
    assert ref.url in str(e.value)


def test_unreachable_xrootd_names_url(xrootd_server: LakeServer) -> None:  # fixture: fail if xrootd is absent
    # XRootD reads its retry settings once per process: try it in a fresh one so it fails in a second
    code = (
        "from mqexec.lake import Lake, LakeRef, LakeError\n"
        f"url = 'root://127.0.0.1:{free_port()}//lake'\n"
        "try:\n"
        "    Lake(url).get(LakeRef(url + '/objects/ab/abcd', 1, 'abcd'))\n"
        "except LakeError as e:\n"
        "    print(e)\n"
    )
    env = dict(os.environ, XRD_CONNECTIONRETRY="1", XRD_CONNECTIONWINDOW="2")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert "/lake/objects/ab/abcd: read failed: server unreachable" in out.stdout, out.stdout + out.stderr


def test_open_lake(tmp_path: Any) -> None:
    assert open_lake(None) is None
    lake = open_lake(str(tmp_path / "lake"))
    assert isinstance(lake, Lake) and lake.url == f"file://{tmp_path}/lake"
    assert lake.get(lake.put(b"plain path")) == b"plain path"
    assert Lake(f"file://{tmp_path}/x/").url == f"file://{tmp_path}/x"
    with pytest.raises(LakeError, match=r"rot://.*did you mean root://"):
        open_lake("rot://host//data")
    with pytest.raises(LakeError, match=r"did you mean davs://"):
        open_lake("dabs://host/lake")
    with pytest.raises(LakeError, match="unknown lake scheme 'zzqx'"):
        open_lake("zzqx://nowhere")
    with pytest.raises(LakeError, match="not a lake reference"):
        LakeRef.from_dict({"url": "file:///x"})


def test_cache_key_is_unambiguous() -> None:
    assert cache_key("ab", "c") != cache_key("a", "bc")
    assert cache_key("p", 1, 2) == cache_key("p", "1", b"2")
    assert len(cache_key(b"")) == 64


def test_bearer_token_discovery_order(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from mqexec.lake_auth import bearer_token

    for name in ("BEARER_TOKEN", "BEARER_TOKEN_FILE", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    runtime = tmp_path / "run"
    runtime.mkdir()
    (runtime / f"bt_u{os.geteuid()}").write_text("from-xdg\n")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert bearer_token() == "from-xdg"
    (tmp_path / "tok").write_text("  from-file \n")
    monkeypatch.setenv("BEARER_TOKEN_FILE", str(tmp_path / "tok"))
    assert bearer_token() == "from-file"
    monkeypatch.setenv("BEARER_TOKEN", "from-env")
    assert bearer_token() == "from-env"


def test_webdav_bearer_token(
    webdav_token_server: LakeServer, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A WebDAV server that wants a WLCG token: the lake finds it the WLCG way, and never says it."""
    server = webdav_token_server
    assert server.token and server.ca_dir
    for name in ("BEARER_TOKEN", "BEARER_TOKEN_FILE", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    assert not os.path.exists(f"/tmp/bt_u{os.geteuid()}"), "a stray token in /tmp would be used"
    monkeypatch.setenv("X509_CERT_DIR", server.ca_dir)  # the grid's way to trust the server's CA
    url = f"{server.url}/{uuid.uuid4().hex[:8]}"
    with pytest.raises(LakeError, match="authentication/permission refused"):
        Lake(url).put(b"no token")
    (tmp_path / "token").write_text(server.token + "\n")
    monkeypatch.setenv("BEARER_TOKEN_FILE", str(tmp_path / "token"))
    lake = Lake(url)
    ref = lake.put(b"with a token")
    assert lake.get(ref) == b"with a token"
    assert os.path.exists(os.path.join(server.local_dir, ref.url[len(server.url) + 1 :]))
    assert isinstance(lake._store, _Fsspec)
    assert server.token not in repr(lake) + repr(lake._store.fs.client.http.auth)

    caplog.set_level("DEBUG")
    wrong = "tok-wrong-" + "7" * 24
    monkeypatch.setenv("BEARER_TOKEN", wrong)  # BEARER_TOKEN comes before the file
    with pytest.raises(LakeError, match="refused") as e:
        Lake(url).put(b"a wrong token")
    text = "".join(traceback.format_exception(e.value)) + caplog.text
    assert wrong not in text and server.token not in text
