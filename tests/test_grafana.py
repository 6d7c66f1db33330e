"""The Grafana dashboard (examples/grafana/ttsd.json): well formed, and every metric its PromQL
names is one a live daemon exports, with the labels the selectors match on.

Metric names come from a real PromQL parser (``promql-parser``, the Rust parser GreptimeDB uses,
with Python bindings): every vector selector in the parsed expression, by its name or its
``__name__="..."`` matcher. Grafana's own syntax is made PromQL first: range macros such as
``$__rate_interval`` become ``5m``; template variables only appear inside label values, which the
parser takes as strings; ``label_values(selector, label)`` in a variable's query is its selector.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import plausible, save_tiny_vits
from daemon_util import start_daemon, wait_for

promql_parser = pytest.importorskip("promql_parser", reason="the test extra's promql-parser")

DASHBOARD = Path(__file__).resolve().parent.parent / "examples" / "grafana" / "ttsd.json"
# labels Prometheus adds to every series it scrapes: selectors may match on them
TARGET_LABELS = {"instance", "job"}
# series Prometheus itself records per target, with those labels only: "is the box answering"
PROMETHEUS_SERIES = {"up": TARGET_LABELS, "scrape_duration_seconds": TARGET_LABELS}
TEMPLATE_VARIABLES = {"datasource", "instance", "voice"}


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels inside collapsed rows included."""
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def promql(expr: str) -> str:
    """Grafana's interval macros, which stand where PromQL wants a duration, made a duration."""
    return re.sub(r"\$(__rate_interval|__interval|__range)\b|\$\{(__rate_interval|__interval|__range)\}",
                  "5m", expr)


def variable_query(query: str | dict[str, Any]) -> str | None:
    """The PromQL inside a query variable: ``label_values(sel, label)`` -> ``sel``,
    ``query_result(expr)`` -> ``expr``; None for queries that name no metric."""
    text = query.get("query", "") if isinstance(query, dict) else query
    if m := re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", text, re.DOTALL):
        return m.group(1)
    if m := re.fullmatch(r"\s*query_result\((.*)\)\s*", text, re.DOTALL):
        return m.group(1)
    return None


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target, query variable and annotation."""
    found = []
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            found.append((f"annotation {annotation['name']}", annotation["expr"]))
    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append((f"panel {panel['id']} {panel.get('title')!r} {target.get('refId')}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query" and (expr := variable_query(variable.get("query", ""))):
            found.append((f"variable {variable['name']}", expr))
    return found


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched on) for each vector selector in ``expr``."""
    found: list[tuple[str, set[str]]] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = node.matchers.matchers
            name = node.name or next((m.value for m in matchers if m.name == "__name__"), None)
            assert name, f"a selector without a metric name in {expr!r}"
            found.append((name, {m.name for m in matchers if m.name != "__name__"}))
        return True

    promql_parser.walk(promql_parser.parse(promql(expr)), visit)
    return found


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
            "summary": ("", "_sum", "_count")}


def exported(metrics_text: str) -> dict[str, set[str] | None]:
    """Sample name (``ttsd_requests_total``, ``ttsd_request_seconds_bucket``, ...) -> its label
    names; None for a family declared (HELP and TYPE) with no series yet, such as
    ``ttsd_signature_failures_total`` before any refusal: its labels cannot be seen."""
    from prometheus_client.parser import text_string_to_metric_families

    names: dict[str, set[str] | None] = {}
    for family in text_string_to_metric_families(metrics_text):
        for suffix in SUFFIXES.get(family.type, ("",)):
            names.setdefault(family.name + suffix, None)
        for sample in family.samples:
            names[sample.name] = (names.get(sample.name) or set()) | set(sample.labels)
    return names


def problems(exprs: list[tuple[str, str]], names: dict[str, set[str] | None]) -> list[str]:
    """What the dashboard asks for that ``names`` lacks: metrics, and labels a selector matches on."""
    found = []
    for where, expr in exprs:
        for metric, labels in selectors(expr):
            if metric in PROMETHEUS_SERIES:
                if missing := labels - PROMETHEUS_SERIES[metric]:
                    found.append(f"{where}: {metric} has no label {', '.join(sorted(missing))}")
                continue
            if metric not in names:
                found.append(f"{where}: {metric} is not exported")
            elif (seen := names[metric]) is not None and (missing := labels - seen - TARGET_LABELS):
                found.append(f"{where}: {metric} has no label {', '.join(sorted(missing))}")
    return found


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def test_the_dashboard_is_a_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    """Ids unique; every panel but a row reads from the datasource variable, with targets that
    parse; template variables for the datasource, the daemon and the voice; on a 24-column grid."""
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == TEMPLATE_VARIABLES
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    everything = list(panels(dashboard["panels"]))
    ids = [p["id"] for p in everything]
    assert len(ids) == len(set(ids)), ids
    shown = [p for p in everything if p["type"] != "row"]
    assert len(shown) >= 12
    for panel in everything:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
    for panel in shown:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and panel.get("description"), panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"], panel["title"]
            # filters only by the template variables there are
            used = set(re.findall(r"\$\{?(\w+)", target["expr"])) - {"__rate_interval", "__interval", "__range"}
            assert used <= TEMPLATE_VARIABLES, (panel["title"], used)
            assert selectors(target["expr"]), panel["title"]
    titles = " ".join(p["title"].lower() for p in shown)
    for subject in ("requests", "failures", "latency", "real-time factor", "queue", "swaps", "rollbacks",
                    "refusals", "canary", "up / down", "memory per box", "memory per voice", "active version",
                    "by version", "first audio", "restarts"):
        assert subject in titles, subject
    marks = {a["name"]: a for a in dashboard["annotations"]["list"] if a.get("expr")}
    assert set(marks) == {"Swaps", "Rollbacks"}
    for mark in marks.values():
        assert mark["datasource"] == {"type": "prometheus", "uid": "${datasource}"} and mark["enable"]


def test_the_check_reports_what_a_daemon_does_not_export() -> None:
    """The check against a registry like the daemon's: a made-up metric, a histogram named without
    its _bucket, a counter without _total and a label the metric lacks are each reported; what
    exists passes."""
    from ttsd.metrics import Metrics

    metrics = Metrics.create()
    metrics.requests.labels("v", "1", "synthesize", "ok").inc()
    metrics.observe_request("v", "1", "synthesize", 0.2)
    names = exported(metrics.render().decode())
    wrong = [
        ("made up", 'rate(ttsd_made_up_total{voice=~"$voice"}[$__rate_interval])'),
        ("bare histogram", "histogram_quantile(0.5, sum by (le) (rate(ttsd_request_seconds[5m])))"),
        ("no _total", "rate(ttsd_requests[5m])"),
        ("no such label", 'sum(ttsd_queue_depth{voice=~"$voice"})'),
        ("by __name__", '{__name__="ttsd_made_up"}'),
        ("up has no voice", 'up{voice="x"}'),
    ]
    assert [p.split(":")[0] for p in problems(wrong, names)] == [w for w, _ in wrong]
    right = [("right", ('histogram_quantile(0.99, sum by (voice, le) (rate(ttsd_request_seconds_bucket'
                        '{instance=~"$instance", voice=~"$voice"}[$__rate_interval]))) '
                        '+ on () group_left sum(ttsd_queue_depth{job="ttsd"})'))]
    assert problems(right, names) == []
    assert variable_query({"query": 'label_values(ttsd_queue_depth{job="x"}, instance)'}) == \
        'ttsd_queue_depth{job="x"}'
    assert variable_query("label_values(instance)") is None


@pytest.mark.daemon
def test_every_metric_the_dashboard_names_is_exported_by_a_live_daemon(tmp_path: Path, cache_dir: Path,
                                                                     dashboard: dict[str, Any]) -> None:
    """1. A daemon serves a tiny voice. 2. It answers a request and refuses one for an unknown
    voice, so the labelled series exist. 3. Every selector in the dashboard names a metric in its
    /metrics, with the labels it matches on. 4. A version 2 dropped in becomes a canary: the
    canary-share gauge says so."""
    models = tmp_path / "models"
    save_tiny_vits(models / "tiny-1", edit=plausible, noise_scale_duration=0.0)
    daemon = start_daemon(tmp_path, cache_dir, "--workers", "1", "--threads", "1", "--no-seed",
                          "--canary", "0.25", "--settle", "0.2", models=models)
    assert daemon.post("/v1/synthesize", {"text": "hello there"}).status == 200
    assert daemon.post("/v1/synthesize", {"text": "hello", "voice": "nobody"}).status == 404
    names = exported(daemon.request("GET", "/metrics").body.decode())
    exprs = expressions(dashboard)
    assert len(exprs) > 20
    assert problems(exprs, names) == []
    # labels were checked on all but the series this daemon has had no cause to make
    unseen = {name for name, labels in names.items() if labels is None}
    assert unseen <= {"ttsd_signature_failures_total", "ttsd_spool_requests_total",  # no signatures, no spool
                      "ttsd_voice_loads_total", "ttsd_voice_evictions_total"}, unseen  # and no memory budget
    # the metrics added for the dashboard are live, not only declared
    assert names["ttsd_synthesis_seconds_total"] >= {"voice", "version"}
    assert daemon.metric("ttsd_synthesis_seconds_total", voice="tiny", version="1") > 0
    assert daemon.metric("ttsd_canary_share", voice="tiny") == 0.0 and "ttsd_canary_share" in names
    assert daemon.metric("ttsd_voice_version_info", voice="tiny", version="1", role="active") == 1
    assert daemon.metric("ttsd_voice_memory_bytes", voice="tiny", version="1") > 0
    assert daemon.metric("ttsd_time_to_first_audio_seconds_count", voice="tiny", version="1") == 1
    assert daemon.metric("ttsd_request_duration_seconds_count", voice="tiny", version="1", route="synthesize") == 1
    staged = save_tiny_vits(tmp_path / "staging" / "tiny-2", version="2", seed=1, edit=plausible,
                            noise_scale_duration=0.0)
    staged.rename(models / "tiny-2")  # published whole
    wait_for(lambda: daemon.metric("ttsd_canary_share", voice="tiny") == 0.25, what="v2 a canary for 25 %")
    assert daemon.metric("ttsd_voice_version_info", voice="tiny", version="2", role="canary") == 1
    assert daemon.stop() == 0, daemon.logs()
