"""Settings refuse what would be unsafe by accident."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings, is_loopback


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
