"""Writes docker/grafana/dashboards/cmt-service.json (Grafana provisions it as a file).

    python docker/grafana/build_dashboards.py          # after changing a panel here

Queries use two Grafana variables only: `$instance` (the replicas shown; All = every one) and
`$__rate_interval`. Bank-wide gauges (the same Redis bank seen by every replica) are combined
with `max`, per-replica rates and queues with `sum` (one uvicorn worker per pod: see
service/metrics.py). `tests/deploy/test_dashboards.py` checks that every metric named here is
exported by the service and evaluates every query on a real Prometheus.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "cmt-service.json"
DS = {"type": "prometheus", "uid": "prometheus"}
INST = 'instance=~"$instance"'
RI = "$__rate_interval"


def _target(expr: str, legend: str, ref: str, *, instant: bool = False, fmt: str = "time_series") -> dict:
    t = {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "format": fmt}
    if instant:
        t.update(instant=True, range=False)
    return t


class Board:
    def __init__(self) -> None:
        self.panels: list[dict] = []
        self.y = 0
        self.x = 0
        self.row_h = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"type": "row", "title": title, "collapsed": False, "id": len(self.panels) + 1,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_h
            self.x, self.row_h = 0, 0

    def panel(self, title: str, targets: list[tuple[str, str]], *, unit: str = "short", w: int = 8, h: int = 8,
              kind: str = "timeseries", description: str = "", stack: bool = False, instant: bool = False) -> None:
        if self.x + w > 24:
            self._newline()
        refs = "ABCDEFGH"
        fmt = "table" if kind == "table" else "time_series"
        p = {
            "type": kind, "title": title, "description": description, "id": len(self.panels) + 1, "datasource": DS,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "targets": [_target(e, leg, refs[i], instant=instant, fmt=fmt) for i, (e, leg) in enumerate(targets)],
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
        }
        if kind == "timeseries":
            p["fieldConfig"]["defaults"]["custom"] = {"lineWidth": 1, "fillOpacity": 10,
                                                      "stacking": {"mode": "normal" if stack else "none"}}
        if kind == "stat":
            p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                            "colorMode": "value", "graphMode": "area", "textMode": "auto"}
        if kind == "table":
            p["transformations"] = [{"id": "labelsToFields", "options": {}},
                                    {"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}]
            p["options"] = {"showHeader": True}
        self.panels.append(p)
        self.x += w
        self.row_h = max(self.row_h, h)


def quantiles(metric: str, sel: str, by: str = "") -> list[tuple[str, str]]:
    extra = f", {by}" if by else ""
    legend = f"{{{{{by}}}}} " if by else ""
    return [(f"histogram_quantile({q}, sum by (le{extra}) (rate({metric}_bucket{{{sel}}}[{RI}])))",
             f"{legend}p{int(q * 100)}")
            for q in (0.5, 0.95, 0.99)]


def build() -> dict:
    b = Board()
    b.row("Requests")
    b.panel("/ask latency p50 / p95 / p99", quantiles("cmt_http_request_duration_seconds", f'route="/ask",{INST}'),
            unit="s", description="Whole request, batching queue included (streams: until the first bytes).")
    b.panel("/ask p95 latency by stage",
            [("histogram_quantile(0.95, sum by (le, stage) "
              f"(rate(cmt_ask_stage_duration_seconds_bucket{{{INST}}}[{RI}])))",
              "{{stage}}")], unit="s",
            description="encode, retrieve, fetch, aggregate, align, generate (per batch) and queue (per request).")
    b.panel("/ask mean time by stage",
            [((f"sum by (stage) (rate(cmt_ask_stage_duration_seconds_sum{{{INST}}}[{RI}])) / "
               f"sum by (stage) (rate(cmt_ask_stage_duration_seconds_count{{{INST}}}[{RI}]))"), "{{stage}}")],
            unit="s", stack=True)
    b.panel("Request rate by route",
            [(f"sum by (route) (rate(cmt_http_requests_total{{{INST}}}[{RI}]))", "{{route}}")], unit="reqps")
    b.panel("Error rate (share of requests)",
            [((f'(sum(rate(cmt_http_requests_total{{status=~"5..",{INST}}}[{RI}])) or vector(0)) / '
               f"sum(rate(cmt_http_requests_total{{{INST}}}[{RI}]))"), "5xx"),
             ((f'(sum(rate(cmt_http_requests_total{{status=~"4..",{INST}}}[{RI}])) or vector(0)) / '
               f"sum(rate(cmt_http_requests_total{{{INST}}}[{RI}]))"), "4xx")], unit="percentunit")
    b.panel("Tokens generated per second",
            [(f"sum by (mode) (rate(cmt_ask_generated_tokens_total{{{INST}}}[{RI}]))", "{{mode}}")], unit="short")
    b.panel("Streamed /ask: time to first token", quantiles("cmt_ask_time_to_first_token_seconds", INST), unit="s")
    b.panel("Model batch size (mean)",
            [((f"sum by (batcher) (rate(cmt_batch_size_sum{{{INST}}}[{RI}])) / "
               f"sum by (batcher) (rate(cmt_batch_size_count{{{INST}}}[{RI}]))"), "{{batcher}}")], unit="short")
    b.panel("Requests in flight", [(f"sum(cmt_http_requests_in_flight{{{INST}}})", "in flight")], unit="short")

    b.row("Ingest")
    b.panel("Ingest rate (documents/s)",
            [(f"sum(rate(cmt_ingest_documents_received_total{{{INST}}}[{RI}]))", "received"),
             (f"sum by (status) (rate(cmt_ingest_documents_total{{{INST}}}[{RI}]))", "{{status}}")], unit="short")
    b.panel("Queue depth", [(f"sum by (batcher) (cmt_queue_depth{{{INST}}})", "{{batcher}}")], unit="short",
            description="Items waiting for a model batch; at CMT_MAX_QUEUE requests get 503 + Retry-After.")
    b.panel("Compression time per batch (Θ)",
            quantiles("cmt_batch_duration_seconds", f'batcher="ingest",{INST}'), unit="s")

    b.row("Memory bank")
    b.panel("Documents in the bank",
            [(f"max(cmt_bank_documents{{{INST}}})", "in Redis"),
             (f"cmt_index_documents{{{INST}}}", "index {{instance}}")], unit="short")
    b.panel("Bytes in the bank",
            [(f"max(cmt_bank_memory_bytes{{{INST}}})", "memories"), (f"max(cmt_bank_text_bytes{{{INST}}})", "text")],
            unit="bytes", stack=True)
    b.panel("Bytes per document",
            [(f"max(cmt_bank_memory_bytes{{{INST}}}) / max(cmt_bank_documents{{{INST}}})", "memory"),
             (f"max(cmt_bank_text_bytes{{{INST}}}) / max(cmt_bank_documents{{{INST}}})", "text")], unit="bytes")
    b.panel("Memories by compressor version",
            [(f"max by (compressor_version) (cmt_bank_memories{{{INST}}})", "{{compressor_version}}")], unit="short",
            stack=True, description="More than one version: run cmt-reindex; stale memories are never served.")
    b.panel("Index kind", [(f"max by (kind) (cmt_index_kind{{{INST}}}) > 0", "{{kind}}")], kind="stat", w=4)
    b.panel("Stale documents", [(f"max(cmt_index_stale_documents{{{INST}}})", "stale")], kind="stat", w=4)

    b.row("Redis, devices, process")
    b.panel("Redis latency p99 by operation",
            [("histogram_quantile(0.99, sum by (le, op) "
              f"(rate(cmt_redis_operation_duration_seconds_bucket{{{INST}}}[{RI}])))",
              "{{op}}")], unit="s")
    b.panel("Redis errors",
            [(f"sum by (op, cause) (rate(cmt_redis_errors_total{{{INST}}}[{RI}]))", "{{op}} {{cause}}")],
            unit="short")
    b.panel("GPU memory",
            [(f"cmt_gpu_memory_allocated_bytes{{{INST}}}", "allocated {{instance}} {{device}}"),
             (f"cmt_gpu_memory_reserved_bytes{{{INST}}}", "reserved {{instance}} {{device}}"),
             (f"cmt_gpu_memory_total_bytes{{{INST}}}", "total {{instance}} {{device}}")], unit="bytes",
            description="Only when the models run on CUDA (CMT_DEVICE=cuda).")
    b.panel("Process memory (RSS)", [(f"process_resident_memory_bytes{{{INST}}}", "{{instance}}")], unit="bytes")
    b.panel("Process CPU", [(f"rate(process_cpu_seconds_total{{{INST}}}[{RI}])", "{{instance}}")], unit="percentunit")
    b.panel("Model load time", [(f"max(cmt_model_load_seconds{{{INST}}})", "load")], kind="stat", unit="s", w=4)
    b.panel("Checkpoint served", [(f"cmt_checkpoint_info{{{INST}}}", "")], kind="table", w=20, instant=True)
    return {
        "uid": "cmt-service", "title": "CMT memory service", "tags": ["cmt"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{
            "name": "instance", "label": "replica", "type": "query", "datasource": DS,
            "query": {"query": "label_values(cmt_http_requests_total, instance)", "refId": "instance"},
            "definition": "label_values(cmt_http_requests_total, instance)",
            "includeAll": True, "multi": True, "allValue": ".+", "refresh": 2,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        }]},
        "panels": b.panels,
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {OUT}")
