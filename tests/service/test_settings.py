"""Settings refuse what would be unsafe by accident."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.errors import InvalidInputError
from service.settings import Settings, is_loopback
from service.storage.replication import ReplicaAcks, default_wait_replicas


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.1.1", "localhost", "::1", "[::1]"])
def test_loopback_hosts_need_no_keys(host):
    assert is_loopback(host) and not Settings(host=host).is_open


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "cmt.example.com"])
def test_a_reachable_host_without_write_keys_is_refused_with_what_to_do(host):
    with pytest.raises(ValidationError, match="CMT_API_KEYS.*CMT_ALLOW_OPEN=true"):
        Settings(host=host)
    assert Settings(host=host, api_keys=["k"]).is_open is False
    assert Settings(host=host, allow_open=True).is_open is True


def test_the_environment_can_declare_an_open_deployment(monkeypatch):
    monkeypatch.setenv("CMT_HOST", "0.0.0.0")
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.setenv("CMT_ALLOW_OPEN", "true")
    assert Settings().is_open


@pytest.mark.parametrize(("url", "replicas"), [
    (None, 0), ("redis://127.0.0.1:6379/0", 0), ("rediss://h:6380/0", 0), ("unix:///tmp/redis.sock", 0),
    ("redis+cluster://h:7000", 1), ("rediss+cluster://h:7000", 1), ("redis+sentinel://h:26379/mymaster", 1),
])
def test_writes_wait_for_a_replica_by_default_only_where_a_fail_over_can_happen(url, replicas):
    assert Settings(redis_url=url).redis_wait_replicas is None  # unset: decided by the URL
    assert default_wait_replicas(url) == replicas


def test_replica_acknowledgement_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("CMT_REDIS_WAIT_REPLICAS", "2")
    monkeypatch.setenv("CMT_REDIS_WAIT_TIMEOUT_MS", "250")
    s = Settings()
    assert (s.redis_wait_replicas, s.redis_wait_timeout_ms) == (2, 250)
    with pytest.raises(ValidationError):
        Settings(redis_wait_timeout_ms=0)  # WAIT 0 would block forever
    with pytest.raises(ValidationError):
        Settings(redis_wait_replicas=-1)
    with pytest.raises(InvalidInputError):
        ReplicaAcks(1, timeout_ms=0)
