"""The building blocks of caching: identities of code and data, memoized calls, shared caches, the CLI."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from lake_servers import LakeServer, xrootd_server

from mqexec.cache import Cache, Memoized, args_key, identity, memo_key
from mqexec.cache_cli import register_cli

__all__ = ["xrootd_server"]  # fixture used by name below

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this module


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def test_identity_follows_the_source_of_modules_pickled_by_reference(tmp_path: Path, monkeypatch) -> None:
    """A class pickled by reference: its pickle is only its name, so the identity reads the source of its
    module and of the user's modules that module imports."""
    _write(tmp_path / "anapkg" / "__init__.py", "")
    _write(tmp_path / "anapkg" / "helpers.py", "FACTOR = 2\n\ndef scale(x):\n    return FACTOR * x\n")
    _write(
        tmp_path / "anapkg" / "proc.py",
        """
        from .helpers import scale

        class Proc:
            def __init__(self, cut=30.0):
                self.cut = cut

            def process(self, x):
                return scale(x) if x > self.cut else 0
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from anapkg.proc import Proc

    assert b"anapkg.proc" in cloudpickle.dumps(Proc())  # by reference: the code is not in the pickle
    first = identity(Proc())
    assert identity(Proc()) == first and identity(Proc(cut=40.0)) != first  # state counts
    helpers = tmp_path / "anapkg" / "helpers.py"
    original = helpers.read_text()
    helpers.write_text(original.replace("FACTOR = 2", "FACTOR = 3"))  # a helper it imports is edited
    assert identity(Proc()) != first
    helpers.write_text(original)
    assert identity(Proc()) == first
    proc = tmp_path / "anapkg" / "proc.py"
    proc.write_text(proc.read_text().replace("x > self.cut", "x >= self.cut"))  # the class itself
    assert identity(Proc()) != first


_BY_VALUE = """
import sys
sys.path.insert(0, {repo!r})
from mqexec.cache import identity, memo_key

class Analysis:                      # pickled by value (defined in __main__)
    def __init__(self):
        self.names = {{"mu", "e", "tau", "nu"}}
        self.weights = {{"b": 1.0, "a": 2.0}}

    def process(self, x):
        return x in {{"jets", "muons", "electrons"}}

def fit(p):
    return sorted({{"x", "y", "z"}}) + [p]

print(identity(Analysis()), memo_key(fit, ({{"k1", "k2", "k3"}},), {{}}))
"""


def test_identity_is_the_same_in_every_process(tmp_path: Path) -> None:
    """Sets (in state and in code), dict order and cloudpickle's class ids vary per process; the identity
    must not (else a rerun never finds anything)."""
    script = tmp_path / "ident.py"
    script.write_text(_BY_VALUE.format(repo=str(Path(__file__).resolve().parent.parent)))
    outs = {
        subprocess.run(
            [sys.executable, str(script)], env=dict(os.environ, PYTHONHASHSEED=str(seed)), capture_output=True,
            text=True, check=True,
        ).stdout
        for seed in (1, 2, 3)
    }  # fmt: skip
    assert len(outs) == 1, outs


def test_args_and_memo_keys() -> None:
    assert args_key(1, x=2) == args_key(1, x=2) != args_key(1, x=3)
    assert args_key({"a": 1, "b": 2}) == args_key({"b": 2, "a": 1})
    assert args_key([1, 2]) != args_key((1, 2))

    def f(x):
        return x + 1

    def g(x):
        return x + 2

    assert memo_key(f, (1,), {})[0] == memo_key(f, (2,), {})[0] != memo_key(g, (1,), {})[0]
    assert memo_key(f, (1,), {})[1] != memo_key(f, (2,), {})[1]
    assert memo_key(f, (1,), {})[0].startswith("fn-")


# -------------------------------------------------------------------------------------- memoized calls
def _counted_square(log: str, x: int) -> int:
    with open(log, "a") as f:
        f.write(f"{x}\n")
    return x * x


def test_memoized_calls_on_workers(client, start_worker, xrootd_server: LakeServer, tmp_path: Path) -> None:
    """What ``submit(..., cache=True)`` is made of: ``Cache.plan`` on the client, ``Memoized`` on a worker."""
    start_worker("--concurrency", "2")
    cache = Cache(f"{xrootd_server.url}/{tmp_path.name}")
    log = tmp_path / "calls.log"
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [((str(log), x), {}) for x in range(6)]

    plan = cache.plan(_counted_square, calls)
    assert plan.hits == {}
    futures = client.map(plan.function, plan.keys, [str(log)] * 6, range(6), pure=False)
    assert client.gather(futures) == [x * x for x in range(6)]
    assert sorted(int(x) for x in log.read_text().split()) == list(range(6))

    again = cache.plan(_counted_square, [*calls, ((str(log), 7), {})])  # one listing for all seven
    assert again.hits == {x: x * x for x in range(6)}
    assert again.keys[:6] == plan.keys
    # a record written meanwhile (another client, a redelivery) is used on the worker too: no run
    assert client.submit(plan.function, plan.keys[3], str(log), 3, pure=False).result(60) == 9
    assert len(log.read_text().split()) == 6

    def other(log: str, x: int) -> int:  # other code: other records
        return x * x

    assert cache.plan(other, calls).hits == {}


def test_submit_and_map_with_cache_true(broker_url, settings, start_worker, tmp_path: Path) -> None:
    """``submit/map(..., cache=True)``: a second client (a rerun) runs nothing; other code or arguments run."""
    import mqexec

    start_worker("--concurrency", "2")
    log = tmp_path / "calls.log"
    options = {**settings, "cache_url": str(tmp_path / "memo")}
    with mqexec.Client(broker_url, **options) as client:
        assert client.gather(client.map(_counted_square, [str(log)] * 4, range(4), cache=True)) == [0, 1, 4, 9]
        assert client.submit(_counted_square, str(log), 5, cache=True).result(60) == 25
    assert sorted(int(x) for x in log.read_text().split()) == [0, 1, 2, 3, 5]
    with mqexec.Client(broker_url, **options) as client:  # the rerun: every call is found in the lake
        futures = client.map(_counted_square, [str(log)] * 5, range(5), cache=True)
        assert client.gather(futures) == [0, 1, 4, 9, 16]
        assert client.stats()["counts"]["cache_hits"] == 4
        dependent = client.submit(lambda x: x + 1, futures[3])  # a hit's value feeds a task like any result
        assert dependent.result(60) == 10
    assert sorted(int(x) for x in log.read_text().split()) == [0, 1, 2, 3, 4, 5]  # only x=4 was new
    with mqexec.Client(broker_url, **options) as client, pytest.raises(ValueError, match="pass values"):
        client.submit(_counted_square, str(log), client.submit(abs, -1), cache=True)
    with mqexec.Client(broker_url, **settings) as client, pytest.raises(mqexec.ConfigError, match="cache_url"):
        client.submit(_counted_square, str(log), 1, cache=True)


def test_shared_caches_read_a_colleague_s_write_your_own(tmp_path: Path) -> None:
    colleague, mine = tmp_path / "colleague", tmp_path / "mine"
    log = tmp_path / "calls.log"
    theirs = Cache(str(colleague))
    plan = theirs.plan(_counted_square, [((str(log), 3), {})])
    assert plan.function(plan.keys[0], str(log), 3) == 9  # the colleague's run (Memoized, run here)
    before = sorted(p.relative_to(colleague) for p in colleague.rglob("*"))

    shared = Cache([str(mine), str(colleague)])
    assert shared.write_url.endswith("/mine")
    plan = shared.plan(_counted_square, [((str(log), 3), {}), ((str(log), 4), {})])
    assert plan.hits == {0: 9}  # found in the colleague's cache
    assert plan.function(plan.keys[1], str(log), 4) == 16  # computed: stored in mine only
    assert sorted(p.relative_to(colleague) for p in colleague.rglob("*")) == before
    assert Cache(str(mine)).plan(_counted_square, [((str(log), 4), {})]).hits == {0: 16}
    assert log.read_text().split() == ["3", "4"]


def test_memoized_store_failure_is_logged_once_and_the_value_returned(tmp_path: Path, caplog) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache's folder should be")
    cache = Cache(f"file://{blocked}")
    memo = Memoized(lambda x: x + 1, cache, "fn-test-0123")
    with caplog.at_level("WARNING", logger="mqexec.cache"):
        assert [memo(f"k{i:03d}", i) for i in range(5)] == [1, 2, 3, 4, 5]
    lines = [r.getMessage() for r in caplog.records if "cache write failed" in r.getMessage()]
    assert len(lines) == 1 and str(blocked) in lines[0]


# --------------------------------------------------------------------------------------------------- CLI
def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="mqexec")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return int(args.run(args))


def _fill(url: str, namespace: str, n: int, about: str) -> Cache:
    cache = Cache(url)
    cache.describe(namespace, about)
    for i in range(n):
        assert cache.store(namespace, f"{i:064x}", os.urandom(1000)) is None
    return cache


@pytest.mark.parametrize("where", ["file", "root"])
def test_cache_ls_du_rm(where: str, tmp_path: Path, capsys, request) -> None:
    if where == "file":
        url, local = f"file://{tmp_path}/c", tmp_path / "c"
    else:
        server = request.getfixturevalue("xrootd_server")
        url, local = f"{server.url}/{tmp_path.name}", Path(server.local_dir, tmp_path.name)
    _fill(url, "coffea-chunks-Ttbar-aaaa", 12, "coffea chunks of agc.Ttbar")
    _fill(url, "fn-fit-bbbb", 3, "")
    old = time.time() - 40 * 86400
    for p in sorted((local / "cache" / "fn-fit-bbbb").iterdir())[:2]:
        os.utime(p, (old, old))  # two records are 40 days old

    assert _cli("cache", "ls", url) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["NAMESPACE", "RECORDS", "SIZE"]
    rows = {line.split()[0]: line.split() for line in out[1:]}
    assert rows["coffea-chunks-Ttbar-aaaa"][1] == "12" and "agc.Ttbar" in out[1] + out[2]
    assert rows["fn-fit-bbbb"][1] == "3"

    assert _cli("cache", "du", url) == 0
    total = capsys.readouterr().out.splitlines()[-1].split()
    assert total[2:5] == ["15", "records", "total"] and total[0] == "15.7"  # 15 x (1000 + 71 bytes of header)

    assert _cli("cache", "rm", url) == 2  # nothing said: nothing removed
    assert _cli("cache", "rm", url, "--older-than", "30d", "--dry-run") == 0
    assert "would remove 2 records" in capsys.readouterr().out
    assert len(list((local / "cache" / "fn-fit-bbbb").iterdir())) == 4  # 3 records + _about
    assert _cli("cache", "rm", url, "--older-than", "30d") == 0
    assert "removed 2 records" in capsys.readouterr().out
    assert sorted(p.name for p in (local / "cache" / "fn-fit-bbbb").iterdir()) == [f"{2:064x}", "_about"]
    assert _cli("cache", "rm", url, "coffea-chunks-Ttbar-aaaa") == 0
    assert "removed 12 records" in capsys.readouterr().out
    assert list((local / "cache" / "coffea-chunks-Ttbar-aaaa").iterdir()) == []  # its _about went too
    assert _cli("cache", "ls", url) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == ["fn-fit-bbbb"]


def test_cache_cli_without_url(monkeypatch) -> None:
    from mqexec.lake import LakeError

    monkeypatch.delenv("MQEXEC_CACHE_URL", raising=False)
    with pytest.raises(LakeError, match="no cache URL"):
        _cli("cache", "ls")


# --------------------------------------------------------------------------------------------- outputs
def test_open_output_in_a_task_context(tmp_path: Path, monkeypatch) -> None:
    """What the worker's ``task_context`` gives ``open_output``: the lake, and names from the task's key."""
    from mqexec.lake import LakeError, open_output
    from mqexec.outputs import task_context

    lake = f"file://{tmp_path}/lake"
    with task_context(lake, "chunk-key-1"):
        with open_output("skims/s_{n}.txt") as f:
            f.write(b"first")
        with open_output("skims/s_{n}.txt") as g:
            g.write(b"second")
        with pytest.raises(ZeroDivisionError), open_output("skims/broken_{n}.txt") as h:
            h.write(b"half")
            1 / 0  # noqa: B018
    assert f.url.startswith(f"{lake}/skims/s_") and g.url == f.url.replace(".txt", "-1.txt")
    assert sorted(p.name for p in (tmp_path / "lake" / "skims").iterdir()) == sorted(
        [f.url.rsplit("/", 1)[1], g.url.rsplit("/", 1)[1]]
    )  # the broken one left nothing, not even a temporary file
    with task_context(lake, "chunk-key-1"), open_output("skims/s_{n}.txt") as again:
        again.write(b"rerun")  # the same task again: the same name, replaced
    assert again.url == f.url and Path(f.url.removeprefix("file://")).read_bytes() == b"rerun"
    with task_context(lake, "chunk-key-2"), open_output("skims/s_{n}.txt") as other:
        other.write(b"other task")
    assert other.url != f.url

    monkeypatch.delenv("MQEXEC_LAKE_URL", raising=False)
    with pytest.raises(LakeError, match="no data lake"):
        open_output("x.txt")
    with pytest.raises(ValueError, match="mode 'wb'"):
        open_output(f"{lake}/x.txt", "w")
    with open_output(f"{lake}/direct/x.txt") as d:  # a full URL needs no context
        d.write(b"direct")
    assert (tmp_path / "lake" / "direct" / "x.txt").read_bytes() == b"direct"
