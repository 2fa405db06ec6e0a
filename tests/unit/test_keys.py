"""Keys without a broker: text forms, what a worker's token can and cannot do, per-session result keys, key files.

(The attacks through a broker — a task signed with what a worker holds, frames of another session, replays — are
in ``tests/test_security.py``.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mqexec.errors import ConfigError
from mqexec.keys import Identity, Trust, default_key_file, load_identity, read_private


def test_an_identity_and_its_token_survive_their_text_forms() -> None:
    me = Identity.new()
    assert Identity.parse(me.text()) == me
    assert Identity.parse(f"  {me.text()}\n").trust == me.trust
    assert Trust.parse(me.trust.token()) == me.trust
    assert me.text().startswith("mqxk1.") and me.trust.token().startswith("mqxw1.")
    assert len(me.trust.key_id) == 16 and me.trust.key_id != Identity.new().trust.key_id


def test_a_token_verifies_but_holds_nothing_that_signs() -> None:
    me = Identity.new()
    token = me.trust.token()
    seed_text = me.text().split(".")[1]
    assert seed_text not in token
    sig = me.sign(b"task")
    assert Trust.parse(token).verify(b"task", sig)
    assert not Trust.parse(token).verify(b"task!", sig)
    assert not Trust.parse(token).verify(b"task", sig[:-1] + bytes([sig[-1] ^ 1]))
    assert not Trust.parse(token).verify(b"task", b"short")
    assert not Identity.new().trust.verify(b"task", sig)


def test_result_keys_differ_per_session_and_per_identity() -> None:
    me = Identity.new()
    assert me.trust.result_key("s1") == Trust.parse(me.trust.token()).result_key("s1")
    assert me.trust.result_key("s1") != me.trust.result_key("s2")
    assert me.trust.result_key("s1") != Identity.new().trust.result_key("s1")
    assert len(me.trust.result_key("s1")) == 32


def test_no_secret_in_a_repr() -> None:
    me = Identity.new()
    for secret in (me.text().split(".")[1], me.text().split(".")[2]):
        assert secret not in repr(me) and secret not in repr(me.trust)


@pytest.mark.parametrize(
    "text",
    ["", "mqxw1", "mqxw1.AAAA.AAAA", "mqxk1.{a}.{b}", "mqxw1.{a}", "mqxw1.{a}.{b}.{b}", "mqxw1.!!!.{b}", "x.{a}.{b}"],
)
def test_what_is_not_a_worker_token_is_one_sentence_without_echoing_it(text: str) -> None:
    me = Identity.new()
    _, a, b = me.trust.token().split(".")
    text = text.format(a=a, b=b)
    with pytest.raises(
        ConfigError, match=r"this is not an mqexec worker key \(expected 'mqxw1.<key>.<secret>'"
    ) as info:
        Trust.parse(text)
    message = str(info.value)
    assert "\n" not in message and b not in message


def test_a_worker_token_is_not_an_identity() -> None:
    with pytest.raises(ConfigError, match="this is not an mqexec signing identity"):
        Identity.parse(Identity.new().trust.token())


def test_the_key_file_is_made_private_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "key"
    old = os.umask(0)
    try:
        me = load_identity(path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "deep").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "deep" / "er").stat().st_mode & 0o777 == 0o700
    assert load_identity(path) == me  # made once, read after


def test_the_default_key_file_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert default_key_file() == tmp_path / "mqexec" / "key"
    me = load_identity()
    assert Identity.parse((tmp_path / "mqexec" / "key").read_text()) == me


def test_without_create_a_missing_key_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"cannot read the signing key file {tmp_path / 'key'}: No such file"):
        load_identity(tmp_path / "key", create=False)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o610])
def test_a_key_file_others_can_read_is_refused_naming_the_fix(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "secret"
    path.write_text(Identity.new().trust.token())
    path.chmod(mode)
    with pytest.raises(ConfigError, match=f"mode {mode:04o}.*it must be private: run `chmod 600 {path}`") as info:
        read_private(path, "worker key file")
    assert "mqxw1" not in str(info.value)


def test_an_empty_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=f"the worker key file {path} is empty"):
        read_private(path, "worker key file")
