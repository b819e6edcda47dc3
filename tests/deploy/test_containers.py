"""Dockerfile (static checks: no Docker engine runs here) and docker-compose.yml (validated by the
compose client itself, `docker compose config` or `docker-compose config`, which needs no engine);
the Prometheus configuration with promtool."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import ROOT


def compose_cmd() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if os.environ.get("CI"):
        pytest.fail("a compose client is required in CI: apt-get install -y docker-compose")
    pytest.skip("no compose client (docker compose / docker-compose)")


def compose_config(path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CMT_", "COMPOSE_", "TORCH_INDEX"))}
    return subprocess.run([*compose_cmd(), "-f", str(path), "--project-directory", str(ROOT), "config"],
                          capture_output=True, text=True, env=env, timeout=60, check=False)


def stages(text: str) -> list[list[str]]:
    """Instructions of each stage (continuation lines joined, comments dropped)."""
    lines = re.sub(r"\\\n", " ", text).splitlines()
    out: list[list[str]] = []
    for line in (raw.strip() for raw in lines):
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            out.append([])
        if out:
            out[-1].append(line)
    return out


def test_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    st = stages(text)
    assert len(st) >= 2, "multi-stage build"
    runtime = st[-1]
    assert any(re.match(r"COPY --from=build /opt/venv", i) for i in runtime), "runtime copies only the built venv"
    assert not any("pip install" in i for i in runtime), "nothing is built in the runtime stage"
    user = [i.split()[1] for i in runtime if i.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in ("root", "0"), "non-root user"
    health = [i for i in runtime if i.startswith("HEALTHCHECK")]
    assert health and "/healthz" in health[0]
    assert re.search(r"ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu", text), "CPU torch by default"
    assert "cu128" in text, "the CUDA build argument is documented"
    assert re.search(r"CMT_HOST=0\.0\.0\.0", text), "listens outside the container"
    assert "EXPOSE 8000" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    for must in (".venv", ".git", ".data", "tests"):
        assert must in ignored
    for copy in re.findall(r"^COPY (?!--)(\S+(?: \S+)*) \S+$", text, re.MULTILINE):
        for src in copy.split():
            assert (ROOT / src).exists() and src not in ignored, src


def test_compose_config_is_valid():
    out = compose_config(ROOT / "docker-compose.yml")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    s = cfg["services"]
    assert set(s) >= {"cmt", "redis", "prometheus", "grafana"}
    env = s["cmt"]["environment"]
    assert env["CMT_REDIS_URL"] == "redis://redis:6379/0"
    assert s["cmt"]["depends_on"]["redis"]["condition"] == "service_healthy"

    def mounts(svc):
        out = {}
        for v in s[svc]["volumes"]:
            src, dst = (v["source"], v["target"]) if isinstance(v, dict) else v.split(":")[:2]
            out[dst] = src
        return out

    redis = mounts("redis")
    assert redis["/data"] == "redis-data" and "redis-data" in cfg["volumes"]
    conf_src = redis["/usr/local/etc/redis/redis.conf"]
    assert "appendonly yes" in Path(conf_src).read_text()
    assert "/usr/local/etc/redis/redis.conf" in s["redis"]["command"]
    prom = mounts("prometheus")
    assert os.path.samefile(prom["/etc/prometheus/prometheus.yml"], ROOT / "docker/prometheus/prometheus.yml")
    scrape = yaml.safe_load((ROOT / "docker/prometheus/prometheus.yml").read_text())["scrape_configs"]
    assert any("cmt:8000" in t for j in scrape for sc in j["static_configs"] for t in sc["targets"])
    graf = mounts("grafana")
    assert os.path.samefile(graf["/etc/grafana/provisioning"], ROOT / "docker/grafana/provisioning")
    assert os.path.samefile(graf["/var/lib/grafana/dashboards"], ROOT / "docker/grafana/dashboards")


def test_compose_client_rejects_a_broken_file(tmp_path):
    cfg = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    cfg["services"]["redis"]["healthcheck"]["tset"] = ["CMD", "true"]  # a typo: unknown key
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(cfg))
    assert compose_config(broken).returncode != 0


def test_prometheus_config_and_rules():
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required in CI: apt-get install -y prometheus")
        pytest.skip("promtool not installed")
    rules = sorted((ROOT / "docker/prometheus/rules").glob("*.yml"))
    out = subprocess.run([promtool, "check", "rules", *map(str, rules)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run([promtool, "check", "config", "--syntax-only", str(ROOT / "docker/prometheus/prometheus.yml")],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
