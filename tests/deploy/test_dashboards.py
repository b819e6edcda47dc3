"""Dashboards: valid provisioning files, every metric a query names is exported by the service, and
every query (and alert rule) evaluates on a real Prometheus scraping a running service."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.conftest import ROOT, free_port, send_traffic

GRAFANA = ROOT / "docker" / "grafana"
RULES = ROOT / "docker" / "prometheus" / "rules"
# Grafana's variables as the tests substitute them (All replicas; a window of several scrapes).
VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$instance": ".+"}
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "rate", "irate", "increase", "histogram_quantile", "vector", "by", "without",
    "or", "and", "unless", "on", "ignoring", "group_left", "group_right", "bool", "offset", "topk", "bottomk",
    "clamp_min", "clamp_max", "abs", "label_values", "time", "scalar", "delta", "deriv", "avg_over_time",
    "max_over_time", "count_over_time",
}
# Series that exist only in some deployments or after failures: a query on them may be empty.
MAY_BE_EMPTY = re.compile(r"cmt_gpu_|_errors_total")


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((GRAFANA / "dashboards").glob("*.json"))}


def panels(board: dict) -> list[dict]:
    out = []
    for p in board["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return out


def queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expression) of every target."""
    return [(name, p["title"], t["expr"]) for name, b in dashboards().items() for p in panels(b)
            for t in p.get("targets", [])]


def substitute(expr: str) -> str:
    for k, v in VARIABLES.items():
        expr = expr.replace(k, v)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names of a PromQL expression: identifiers that are not functions, keywords or labels."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)  # label lists
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e)) - PROMQL_WORDS
    return {n for n in names if not re.fullmatch(r"\d+[smhdwy]?|e\d*|Inf|NaN", n)}


def exported_names(text: str) -> set[str]:
    """Every series name the exposition text declares, samples or not (a GPU gauge on a CPU host)."""
    names = set()
    for f in text_string_to_metric_families(text):
        names |= {s.name for s in f.samples}
        names |= {f.name} if f.type in ("gauge", "untyped") else set()
        names |= {f.name + "_total"} if f.type == "counter" else set()
        names |= {f.name + s for s in ("_bucket", "_sum", "_count")} if f.type == "histogram" else set()
        names |= {f.name + "_info"} if f.type == "info" else set()
    return names


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is required in CI (apt-get install prometheus)")
        pytest.skip(f"{tool} not installed (apt-get install prometheus)")
    return path


# ---- static ------------------------------------------------------------------------------------


def test_provisioning_files():
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "cmt.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    boards = dashboards()
    assert boards, "no dashboard JSON in docker/grafana/dashboards"
    for name, b in boards.items():
        ids = [p["id"] for p in panels(b)]
        assert len(ids) == len(set(ids)), name
        for p in panels(b):
            for t in p.get("targets", []):
                assert t["datasource"]["uid"] == uid, (name, p["title"])
    titles = " | ".join(p["title"] for b in boards.values() for p in panels(b))
    for wanted in ("/ask latency", "by stage", "Request rate", "Error rate", "Ingest rate", "Queue depth",
                   "Documents in the bank", "Bytes in the bank", "Bytes per document", "Redis latency", "GPU memory"):
        assert wanted in titles, wanted


def test_dashboard_json_is_generated():
    import runpy

    build = runpy.run_path(str(GRAFANA / "build_dashboards.py"))["build"]
    assert dashboards()["cmt-service.json"] == build(), "run python docker/grafana/build_dashboards.py"


def test_metric_name_extraction():
    expr = ('histogram_quantile(0.95, sum by (le, stage) '
            '(rate(cmt_a_bucket{route="/x",i=~"$instance"}[$__rate_interval])))')
    assert metric_names(expr) == {"cmt_a_bucket"}
    assert metric_names("max(cmt_b) / max(cmt_c) or vector(0) > 0") == {"cmt_b", "cmt_c"}


# ---- against the running service --------------------------------------------------------------------


def test_every_dashboard_metric_is_exported(served):
    exported = exported_names(httpx.get(served.base + "/metrics").text)
    for board, title, expr in queries():
        names = metric_names(expr)
        assert names, f"{board} / {title}: no metric in {expr}"
        missing = names - exported
        assert not missing, f"{board} / {title}: {sorted(missing)} not exported by the service"


def test_prometheus_evaluates_every_query(served, tmp_path):
    prometheus = need("prometheus")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in sorted(RULES.glob("*.yml"))],
        "scrape_configs": [{"job_name": "cmt", "static_configs": [{"targets": [f"127.0.0.1:{served.port}"]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        with httpx.Client(timeout=10) as c:

            def query(expr: str) -> list:
                body = c.get(f"{api}/query", params={"query": expr}).json()
                assert body["status"] == "success", f"{expr}: {body.get('errorType')}: {body.get('error')}"
                return body["data"]["result"]

            deadline = time.monotonic() + 30
            while True:  # ready (it answers 503 in plain text while its storage opens)
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                try:
                    if c.get(f"http://127.0.0.1:{port}/-/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "Prometheus did not start"
                time.sleep(0.2)
            while True:  # scraped a few times, with traffic in between so rates are not zero
                samples = query('count_over_time(up{job="cmt"}[1m])')
                if samples and float(samples[0]["value"][1]) >= 4:
                    break
                if samples:
                    send_traffic(served.base, rounds=1)
                assert time.monotonic() < deadline, "Prometheus did not scrape the service"
                time.sleep(0.5)
            assert float(query('up{job="cmt"}')[0]["value"][1]) == 1

            empty = []
            for board, title, expr in queries():
                if not query(substitute(expr)) and not MAY_BE_EMPTY.search(expr):
                    empty.append(f"{board} / {title}: {expr}")
            assert not empty, "queries with no data (a wrong label or metric?):\n" + "\n".join(empty)

            groups = c.get(f"{api}/rules").json()["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            assert rules, "no alert rule loaded"
            for r in rules:
                assert r["health"] == "ok" and not r.get("lastError"), r  # evaluated every second
    finally:
        proc.terminate()
        proc.wait(timeout=10)
