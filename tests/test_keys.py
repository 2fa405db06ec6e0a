"""Keys without a broker: what a worker's token can and cannot do, per-session result keys, secrets at rest.

Issue 10, points 1 and 6: the token a worker holds verifies tasks and signs results but cannot sign a task (the
wire checks are exercised here directly; ``test_security.py`` sends the same forgeries to real workers); the key
directory is made 0700 and the key 0600 whatever the umask, and a key file that group or others may read is
refused with a message naming the file and the ``chmod`` that fixes it — the analyst's key file and a worker's
``MQEXEC_SECRET_FILE`` alike.
"""

from __future__ import annotations

import base64
import hmac
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mqexec.config import Config
from mqexec.errors import ConfigError, SignatureError
from mqexec.keys import Identity, Trust, load_identity, read_private
from mqexec.wire import Call, ForeignKey, Frame, Outcome, Ref, Task, _canonical, result_frame

ROOT = Path(__file__).resolve().parent.parent


def _task(me: Identity, **changes: object) -> Task:
    call = Call("k", "f()", Ref.inline(b"args"))
    task = Task(
        id="m1",
        prefix="ana",
        session="s1",
        key_id=me.trust.key_id,
        nonce="n1",
        expires=time.time() + 60,
        python="3.11",
        reply_to="ana.results.s1",
        fn=Ref.inline(b"fn"),
        calls=(call,),
    )
    return task.copy(**changes)


def _resigned(wire: dict[str, object], signature: bytes) -> dict[str, object]:
    body = {k: v for k, v in wire.items() if k != "sig"}
    return {**body, "sig": base64.b64encode(signature).decode()}


def _body(wire: dict[str, object]) -> bytes:
    return _canonical({k: v for k, v in wire.items() if k != "sig"})


# -- what the token is ------------------------------------------------------------------------------------------


def test_the_token_holds_the_public_half_and_the_result_secret_only() -> None:
    me = Identity.new()
    token = me.trust.token()
    assert token.startswith("mqxw1.") and Trust.parse(token) == me.trust
    seed = base64.urlsafe_b64encode(me.seed).decode().rstrip("=")
    assert seed not in token and seed in me.text()
    assert not hasattr(Trust, "sign")
    with pytest.raises(ConfigError, match="not an mqexec signing identity"):
        Identity.parse(token)  # a worker cannot turn its token into a signing identity


@pytest.mark.parametrize(
    "text", ["", "mqxw1.abc.def", "mqxk1." + "A" * 43 + "." + "A" * 43, "hunter2-secret", "mqxw1.%%%.%%%"]
)
def test_a_malformed_token_is_refused_in_one_sentence_without_echoing_it(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        Trust.parse(text)
    message = str(info.value)
    assert "mqexec key worker" in message and "\n" not in message
    assert not text or text not in message


def test_result_keys_differ_per_session_and_per_identity() -> None:
    me, other = Identity.new(), Identity.new()
    keys = {me.trust.result_key("s1"), me.trust.result_key("s2"), other.trust.result_key("s1")}
    assert len(keys) == 3
    assert Trust.parse(me.trust.token()).result_key("s1") == me.trust.result_key("s1")  # what the worker derives


# -- what a token can sign (nothing a worker runs) ------------------------------------------------------------


def test_only_the_identity_signs_a_task_a_worker_accepts() -> None:
    me = Identity.new()
    trust = Trust.parse(me.trust.token())
    wire = _task(me).sign(me)
    assert Task.verify(wire, trust).calls[0].key == "k"
    own = Identity(Identity.new().seed, trust.result_secret)
    forgeries = {
        "HMAC with the result secret": _resigned(wire, hmac.new(trust.result_secret, _body(wire), "sha256").digest()),
        "HMAC with a result key": _resigned(wire, hmac.new(trust.result_key("s1"), _body(wire), "sha256").digest()),
        "another Ed25519 key": _resigned(wire, own.sign(_body(wire))),
        "no signature": {k: v for k, v in wire.items() if k != "sig"},
        "tampered": {**wire, "prefix": "other"},
        "signature of another task": {**_task(me, nonce="n2").sign(me), "sig": wire["sig"]},
    }
    refused = []
    for name, forged in forgeries.items():
        try:
            Task.verify(forged, trust)
        except SignatureError as exc:
            refused.append(name)
            assert not isinstance(exc, ForeignKey), name  # they all claim the analyst's key id
    assert refused == list(forgeries)
    with pytest.raises(ForeignKey, match="signed by key"):
        Task.verify(_task(own).sign(own), trust)


def test_a_frame_is_read_only_with_its_sessions_key() -> None:
    me = Identity.new()
    value = Outcome("k", True, "builtins.bytes", value=b"the value")
    raw = result_frame("s1", "w@grid", "m1", [value]).encode(me.trust.result_key("s1"))
    assert Frame.decode(raw, me.trust.result_key("s1")).session == "s1"
    for key in (me.trust.result_key("s2"), Identity.new().trust.result_key("s1"), me.trust.result_secret):
        with pytest.raises(SignatureError, match="bad signature"):
            Frame.decode(raw, key)
    with pytest.raises(SignatureError, match="truncated or tampered"):
        Frame.decode(raw[:-1], me.trust.result_key("s1"))
    renamed = raw.replace(b'"w@grid"', b'"m@grid"')  # another worker's name, same length
    with pytest.raises(SignatureError, match="bad signature"):
        Frame.decode(renamed, me.trust.result_key("s1"))


def test_what_an_unverified_message_says_goes_into_errors_cut_short() -> None:
    """Ids, key ids and worker names of messages nobody verified yet end up in log lines: 60 characters each."""
    me, stranger = Identity.new(), Identity.new()
    huge = "x" * 1_000_000
    foreign = {**_task(stranger, id=huge).sign(stranger), "kid": huge}
    forged = {**_task(me, id=huge).sign(me), "sig": base64.b64encode(b"0" * 64).decode()}
    for wire, refusal in ((foreign, ForeignKey), (forged, SignatureError)):
        with pytest.raises(refusal) as info:
            Task.verify(wire, me.trust)
        assert len(str(info.value)) < 300
    raw = Frame(huge, "s1", huge).encode(b"another key")
    with pytest.raises(SignatureError, match="bad signature") as bad:
        Frame.decode(raw, me.trust.result_key("s1"))
    assert len(str(bad.value)) < 300


# -- secrets at rest ------------------------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_key_and_its_directories_are_private_whatever_the_umask(tmp_path: Path) -> None:
    key = tmp_path / "a" / "b" / "mqexec" / "key"
    old = os.umask(0)
    try:
        me = load_identity(key)
    finally:
        os.umask(old)
    assert _mode(key) == 0o600
    assert [_mode(d) for d in (tmp_path / "a", tmp_path / "a" / "b", key.parent)] == [0o700] * 3
    assert load_identity(key) == me  # the same identity next time


def test_mqexec_key_under_umask_000_makes_a_private_config_directory(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "PYTHONPATH": str(ROOT)}
    env.pop("MQEXEC_KEY_FILE", None)
    env.pop("MQEXEC_IDENTITY", None)
    done = subprocess.run(
        [sys.executable, "-m", "mqexec", "key", "worker"], env=env, capture_output=True, text=True, timeout=60, umask=0
    )
    assert done.returncode == 0, done.stderr
    key = tmp_path / "config" / "mqexec" / "key"
    assert Trust.parse(done.stdout.strip()) == load_identity(key).trust
    assert (_mode(tmp_path / "config"), _mode(key.parent), _mode(key)) == (0o700, 0o700, 0o600)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o610])
def test_a_key_file_others_may_read_is_refused_naming_the_chmod(tmp_path: Path, mode: int) -> None:
    key = tmp_path / "key"
    key.write_text(Identity.new().text())
    key.chmod(mode)
    with pytest.raises(ConfigError) as info:
        load_identity(key)
    assert str(info.value) == (
        f"the signing key file {key} can be read by other users (mode {mode:04o}); it must be private: "
        f"run `chmod 600 {key}`"
    )


def test_a_worker_secret_file_others_may_read_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "worker-token"
    secret.write_text(Identity.new().trust.token() + "\n")
    secret.chmod(0o644)
    for name in [n for n in os.environ if n.startswith("MQEXEC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MQEXEC_SECRET_FILE", str(secret))
    with pytest.raises(ConfigError, match=rf"worker key file {secret} can be read by other users.*chmod 600 {secret}"):
        Config.load()
    secret.chmod(0o600)
    assert Config.load().trust() == Trust.parse(secret.read_text())


def test_mqexec_worker_refuses_a_readable_secret_file_in_one_line(tmp_path: Path) -> None:
    secret = tmp_path / "worker-token"
    secret.write_text(Identity.new().trust.token())
    secret.chmod(0o640)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQEXEC_")}
    env |= {"MQEXEC_SECRET_FILE": str(secret), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "mqexec", "worker", "--broker", "amqp://guest:guest@127.0.0.1:1//"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr == (
        f"mqexec: error: the worker key file {secret} can be read by other users (mode 0640); it must be private: "
        f"run `chmod 600 {secret}`\n"
    )
    assert secret.read_text() not in done.stderr


def test_read_private_names_a_missing_or_empty_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"cannot read the worker key file {tmp_path / 'nope'}"):
        read_private(tmp_path / "nope", "worker key file")
    empty = tmp_path / "empty"
    empty.touch(mode=0o600)
    with pytest.raises(ConfigError, match=f"the worker key file {empty} is empty"):
        read_private(empty, "worker key file")
