"""Keys without a broker: what ``tests/test_keys.py`` does not already cover.

That file (issue 10) checks the worker token, malformed tokens, per-session result keys, forged task signatures
and the key files' modes; here: the identity's own text form, ``Trust.verify`` on bad input, key ids, reprs, and
where the key file lives.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mqexec.errors import ConfigError
from mqexec.keys import Identity, default_key_file, load_identity


def test_an_identity_survives_its_text_form() -> None:
    me = Identity.new()
    assert me.text().startswith("mqxk1.")
    assert Identity.parse(me.text()) == me
    assert Identity.parse(f"  {me.text()}\n").trust == me.trust  # as read from a file


@pytest.mark.parametrize("text", ["", "mqxk1.AAAA.AAAA", "mqxk1.{a}.{b}.{b}", "mqxk1.!!!.{b}", "mqxw1.{a}.{b}"])
def test_what_is_not_an_identity_is_one_sentence_without_echoing_it(text: str) -> None:
    _, a, b = Identity.new().text().split(".")
    text = text.format(a=a, b=b)
    with pytest.raises(ConfigError, match=r"this is not an mqexec signing identity \(expected 'mqxk1\.") as info:
        Identity.parse(text)
    assert "\n" not in str(info.value) and b not in str(info.value)


@pytest.mark.parametrize("signature", [b"", b"short", bytes(64), b"x" * 65])
def test_a_malformed_signature_is_false_not_an_exception(signature: bytes) -> None:
    assert Identity.new().trust.verify(b"task", signature) is False


def test_a_flipped_bit_fails_verification() -> None:
    me = Identity.new()
    sig = me.sign(b"task")
    assert me.trust.verify(b"task", sig)
    assert not me.trust.verify(b"task", sig[:-1] + bytes([sig[-1] ^ 1]))


def test_key_ids_are_short_fingerprints() -> None:
    me = Identity.new()
    assert len(me.trust.key_id) == 16 and int(me.trust.key_id, 16) >= 0
    assert me.trust.key_id != Identity.new().trust.key_id


def test_no_secret_in_a_repr() -> None:
    me = Identity.new()
    _, seed, result_secret = me.text().split(".")
    for shown in (repr(me), repr(me.trust), str(me)):
        assert seed not in shown and result_secret not in shown
        assert repr(me.seed) not in shown and repr(me.result_secret) not in shown


def test_the_default_key_file_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert default_key_file() == tmp_path / "mqexec" / "key"
    me = load_identity()
    assert Identity.parse((tmp_path / "mqexec" / "key").read_text()) == me


def test_without_create_a_missing_key_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"cannot read the signing key file {tmp_path / 'key'}: No such file"):
        load_identity(tmp_path / "key", create=False)
    assert not (tmp_path / "key").exists()
