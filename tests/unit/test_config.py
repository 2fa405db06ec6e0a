"""Config without a broker: precedence, the whole-config rule, parsing, validation, what a worker is given."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from mqexec.config import CONFIG_ENV, Config, parse_duration, parse_resources
from mqexec.errors import ConfigError
from mqexec.keys import Identity, Trust

URL = "amqp://guest:guest@127.0.0.1:5672//"


def _one_sentence(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text, text
    return text


def test_arguments_beat_environment_beat_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQEXEC_QUEUE_PREFIX", "from-env")
    monkeypatch.setenv("MQEXEC_CONCURRENCY", "3")
    cfg = Config.load(queue_prefix="from-arg")
    assert (cfg.queue_prefix, cfg.concurrency, cfg.delivery_limit) == ("from-arg", 3, 4)


def test_an_empty_variable_or_a_none_argument_is_not_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQEXEC_QUEUE_PREFIX", "")
    monkeypatch.setenv("MQEXEC_LAKE_URL", "file:///lake")
    cfg = Config.load(lake_url=None)
    assert cfg.queue_prefix == "mqexec" and cfg.lake_url == "file:///lake"


def test_mqexec_config_is_the_whole_config_and_other_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, json.dumps({"queue_prefix": "ana", "concurrency": 2, "idle_timeout": "10m"}))
    monkeypatch.setenv("MQEXEC_QUEUE_PREFIX", "ignored")
    monkeypatch.setenv("MQEXEC_LAKE_URL", "file:///ignored")
    cfg = Config.load(concurrency=5)
    assert (cfg.queue_prefix, cfg.concurrency, cfg.idle_timeout, cfg.lake_url) == ("ana", 5, 600.0, None)


def test_a_broken_mqexec_config_is_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, "{not json")
    with pytest.raises(ConfigError, match=r"\$MQEXEC_CONFIG is not the JSON of an mqexec config") as info:
        Config.load()
    _one_sentence(info.value)


def test_the_secret_file_is_read_when_no_secret_is_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    token = Identity.new().trust.token()
    path = tmp_path / "secret"
    path.write_text(token + "\n")
    path.chmod(0o600)
    monkeypatch.setenv("MQEXEC_SECRET_FILE", str(path))
    assert Config.load().secret == token
    monkeypatch.setenv("MQEXEC_SECRET", "mqxw1.wins")
    assert Config.load().secret == "mqxw1.wins"


@pytest.mark.parametrize(
    "text, seconds",
    [
        (90, 90.0),
        (1.5, 1.5),
        ("90", 90.0),
        ("90s", 90.0),
        ("500 ms", 0.5),
        ("500ms", 0.5),
        ("2.5 min", 150.0),
        ("10m", 600.0),
        ("47h", 169_200.0),
        ("2d", 172_800.0),
        (" 3 seconds ", 3.0),
        ("1 hour", 3600.0),
        (None, None),
    ],
)
def test_durations(text: Any, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["ten", "10 weeks", "-5s", "1e3", "5 s s", ""])
def test_a_bad_duration_says_how_to_write_one(text: str) -> None:
    with pytest.raises(ConfigError, match=r"cannot read duration .*: use a number of seconds or e\.g\. 500ms") as info:
        parse_duration(text)
    _one_sentence(info.value)


def test_durations_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQEXEC_MAX_WALLTIME", "47h")
    monkeypatch.setenv("MQEXEC_LEASE_INTERVAL", "500 ms")
    cfg = Config.load()
    assert cfg.max_walltime == 169_200.0 and cfg.lease_interval == 0.5
    assert cfg.drain_at() == 169_200.0 - 900.0  # 10 %, at most 15 min


@pytest.mark.parametrize("text, value", [("1", True), ("yes", True), ("ON", True), ("0", False), ("off", False)])
def test_booleans(monkeypatch: pytest.MonkeyPatch, text: str, value: bool) -> None:
    monkeypatch.setenv("MQEXEC_SHIP_CODE", text)
    assert Config.load().ship_code is value
    assert Config.load(safe_results=text).safe_results is value


def test_a_bad_boolean_is_one_sentence() -> None:
    with pytest.raises(ConfigError, match="ship_code must be true or false, got 'maybe'") as info:
        Config.load(ship_code="maybe")
    _one_sentence(info.value)


def test_resources() -> None:
    assert parse_resources("GPU=1, MEM=16.5") == {"GPU": 1.0, "MEM": 16.5}
    assert parse_resources({"GPU": 2}) == {"GPU": 2.0}
    assert parse_resources("") == {} and parse_resources(None) == {}
    assert Config.load(resources="GPU=1").resources == {"GPU": 1.0}


@pytest.mark.parametrize(
    "text, message",
    [
        ("GPU", "cannot read resource 'GPU': use NAME=AMOUNT, e.g. GPU=1"),
        ("G P U=1", "cannot read resource 'G P U=1': use NAME=AMOUNT"),
        ("GPU=lots", "cannot read resource 'GPU=lots': 'lots' is not a number"),
    ],
)
def test_a_bad_resource_is_one_sentence(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_resources(text)
    _one_sentence(info.value)


@pytest.mark.parametrize(
    "given, message",
    [
        ({"queue_prefx": "a"}, r"unknown mqexec setting 'queue_prefx' \(did you mean 'queue_prefix'\?\)"),
        ({"concurrency": "eight"}, "concurrency must be a whole number, got 'eight'"),
        ({"concurrency": 0}, "concurrency must be ≥ 1, got 0"),
        ({"delivery_limit": -1}, "delivery_limit must be ≥ 1, got -1"),
        ({"queue_prefix": "has.dot"}, "queue_prefix must be 1-64 letters, digits, '-' or '_', got 'has.dot'"),
        ({"queue_prefix": "x" * 65}, "queue_prefix must be 1-64 letters"),
        ({"lease_interval": "40s"}, r"lease_timeout \(60 s\) must be at least twice lease_interval \(40 s\)"),
        ({"broker_url": "amqp://u:SECRET@:5672//"}, r"broker URL amqp://u:\*\*\*@:5672// names no host"),
        ({"broker_url": "amqq://u:SECRET@h//"}, "unknown broker scheme 'amqq'.*did you mean amqp://"),
        ({"idle_timeout": "soon"}, "cannot read duration 'soon'"),
    ],
)
def test_validation_errors_are_one_sentence_naming_the_setting(given: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        Config.load(**given)
    assert "SECRET" not in _one_sentence(info.value)


def test_a_bad_environment_variable_is_named_like_an_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQEXEC_CONCURRENCY", "many")
    with pytest.raises(ConfigError, match="concurrency must be a whole number, got 'many'"):
        Config.load()


def test_replace_validates_like_load() -> None:
    cfg = Config.load(broker_url=URL)
    assert cfg.replace(idle_timeout="1m").idle_timeout == 60.0
    with pytest.raises(ConfigError, match="concurrency must be ≥ 1"):
        cfg.replace(concurrency=0)


def test_the_transport_is_computed_from_the_url() -> None:
    assert Config.load(broker_url=URL).transport.quorum
    assert Config.load(broker_url="amqps://h:5671//").transport.tls
    assert not Config.load(broker_url="filesystem:///tmp/x").transport.quorum


def test_secrets_are_not_in_the_repr() -> None:
    me = Identity.new()
    cfg = Config.load(broker_url=URL, identity=me.text(), secret=me.trust.token())
    assert me.text() not in repr(cfg) and me.trust.token() not in repr(cfg)


def test_for_worker_gives_the_verifying_half_and_strips_the_identity(tmp_path: Path) -> None:
    me = Identity.new()
    cfg = Config.load(broker_url=URL, identity=me.text(), key_file=str(tmp_path / "key"), queue_prefix="ana")
    worker = cfg.for_worker(concurrency=2)
    assert (worker.identity, worker.key_file) == ("", "")
    assert Trust.parse(worker.secret) == me.trust
    assert worker.trust() == me.trust
    assert (worker.queue_prefix, worker.concurrency, worker.broker_url) == ("ana", 2, URL)
    assert me.text() not in json.dumps(worker.to_env())
    assert not hasattr(worker.trust(), "sign")  # a worker cannot sign tasks


def test_for_worker_without_an_identity_uses_the_users_key_file() -> None:
    cfg = Config.load(broker_url=URL)
    worker = cfg.for_worker()
    key_file = Path(os.environ["XDG_CONFIG_HOME"]) / "mqexec" / "key"  # made the first time, privately
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert worker.trust() == cfg.signer().trust and worker.identity == ""


def test_a_worker_with_no_key_says_how_to_get_one() -> None:
    with pytest.raises(ConfigError, match=r"set MQEXEC_SECRET .* `mqexec key worker`") as info:
        Config.load(broker_url=URL).trust()
    _one_sentence(info.value)


def test_to_env_round_trips_the_whole_config(monkeypatch: pytest.MonkeyPatch) -> None:
    me = Identity.new()
    cfg = Config.load(
        broker_url="amqp://a:5672//;amqp://b:5672//",
        secret=me.trust.token(),
        queue_prefix="ana",
        resources="GPU=1",
        idle_timeout="10m",
        ship_code=False,
        local_workers=3,
    )
    env = cfg.to_env()
    assert set(env) == {CONFIG_ENV}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MQEXEC_QUEUE_PREFIX", "not-this")  # the whole config wins over single variables
    assert Config.load() == cfg


def test_portable_leaves_out_what_belongs_to_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = Config.load(broker_url=URL, key_file="/home/me/.config/mqexec/key", cache_dir="/home/me/cache")
    values = json.loads(cfg.to_env(portable=True)[CONFIG_ENV])
    assert "cache_dir" not in values and "key_file" not in values
    assert values["broker_url"] == URL
    monkeypatch.setenv(CONFIG_ENV, json.dumps(values))
    there = Config.load()
    assert there.key_file == "" and there.cache_dir != "/home/me/cache"
    assert there.replace(cache_dir=cfg.cache_dir, key_file=cfg.key_file) == cfg
