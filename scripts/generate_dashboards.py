#!/usr/bin/env python3
"""Writes Godwit's Grafana dashboards (grafana/dashboards/*.json) from the panel lists below.

The JSON files are what Grafana provisions and what scripts/check_dashboards.py checks; this
script keeps their boilerplate consistent. Edit the panels here, run it, commit both:

    scripts/generate_dashboards.py          # rewrite the JSON files
    scripts/generate_dashboards.py --check  # exit 1 if a JSON file differs from what it would write
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "grafana" / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
# Dashboard JSON schema of Grafana 10/11.
SCHEMA_VERSION = 39

# Label value maps shared by the phase and state timelines.
PHASES = ["setup", "precopy", "stop-and-copy", "postcopy", "completing"]
PHASE_COLORS = ["blue", "green", "red", "orange", "purple"]


def target(expr, legend="", ref="A", instant=False):
    t = {"datasource": DS, "refId": ref, "expr": expr, "editorMode": "code"}
    if legend:
        t["legendFormat"] = legend
    if instant:
        t["instant"] = True
        t["range"] = False
    else:
        t["range"] = True
    return t


def targets(*queries, instant=False):
    """queries: (expr, legend) pairs; refIds A, B, C..."""
    return [
        target(e, legend, chr(ord("A") + i), instant) for i, (e, legend) in enumerate(queries)
    ]


def thresholds(*steps):
    """steps: (value or None, color)"""
    return {
        "mode": "absolute",
        "steps": [{"color": c, "value": v} for v, c in steps],
    }


GREEN = thresholds((None, "green"))


class Layout:
    """Places panels left to right on Grafana's 24-column grid, wrapping rows."""

    def __init__(self):
        self.x = 0
        self.y = 0
        self.row_h = 0
        self.next_id = 1
        self.panels = []

    def _id(self):
        i = self.next_id
        self.next_id += 1
        return i

    def row(self, title):
        if self.x:
            self.y += self.row_h
        self.x, self.row_h = 0, 0
        self.panels.append(
            {
                "id": self._id(),
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def add(self, panel, w, h):
        if self.x + w > 24:
            self.y += self.row_h
            self.x, self.row_h = 0, 0
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        self.panels.append(panel)


def base(kind, title, description, queries, unit, instant=False):
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": targets(*queries, instant=instant),
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": GREEN, "color": {"mode": "palette-classic"}},
            "overrides": [],
        },
    }


def timeseries(title, description, queries, unit="short", stack=False, minimum=None, maximum=None):
    p = base("timeseries", title, description, queries, unit)
    d = p["fieldConfig"]["defaults"]
    d["custom"] = {
        "drawStyle": "line",
        "lineWidth": 1,
        "fillOpacity": 20 if stack else 10,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
    }
    if minimum is not None:
        d["min"] = minimum
    if maximum is not None:
        d["max"] = maximum
    p["options"] = {
        "legend": {"showLegend": True, "displayMode": "list", "placement": "bottom", "calcs": []},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return p


def stat(title, description, queries, unit="short", steps=None, instant=True, text_mode="auto"):
    p = base("stat", title, description, queries, unit, instant=instant)
    p["fieldConfig"]["defaults"]["thresholds"] = steps or GREEN
    p["fieldConfig"]["defaults"]["color"] = {"mode": "thresholds"}
    p["options"] = {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "colorMode": "value",
        "graphMode": "none",
        "justifyMode": "auto",
        "textMode": text_mode,
        "orientation": "auto",
    }
    return p


def bargauge(title, description, queries, unit, minimum=None, maximum=None, steps=None):
    p = base("bargauge", title, description, queries, unit, instant=True)
    d = p["fieldConfig"]["defaults"]
    d["thresholds"] = steps or GREEN
    d["color"] = {"mode": "thresholds"}
    if minimum is not None:
        d["min"] = minimum
    if maximum is not None:
        d["max"] = maximum
    p["options"] = {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "orientation": "horizontal",
        "displayMode": "gradient",
        "showUnfilled": True,
        "minVizHeight": 10,
        "minVizWidth": 0,
        "valueMode": "color",
    }
    return p


def heatmap(title, description, queries, unit):
    """Each series (one per host) is a heatmap row; colour is its value."""
    p = base("heatmap", title, description, queries, unit)
    del p["fieldConfig"]["defaults"]["thresholds"]
    del p["fieldConfig"]["defaults"]["color"]
    p["options"] = {
        "calculate": False,
        "cellGap": 1,
        "color": {
            "mode": "scheme",
            "scheme": "RdYlGn",
            "reverse": True,
            "fill": "dark-orange",
            "scale": "linear",
            "exponent": 0.5,
            "steps": 64,
            "min": 0,
            "max": 1,
        },
        "rowsFrame": {"layout": "auto"},
        "yAxis": {"axisPlacement": "left", "reverse": False},
        "cellValues": {"unit": unit},
        "tooltip": {"show": True, "yHistogram": False},
        "legend": {"show": True},
        "showValue": "never",
        "exemplars": {"color": "rgba(255,0,255,0.7)"},
    }
    return p


def timeline(title, description, queries, mappings, kind="state-timeline"):
    p = base(kind, title, description, queries, "none")
    d = p["fieldConfig"]["defaults"]
    d["color"] = {"mode": "thresholds"}
    d["mappings"] = mappings
    d["custom"] = {"fillOpacity": 80, "lineWidth": 0}
    p["options"] = {
        "showValue": "never",
        "rowHeight": 0.9,
        "legend": {"showLegend": True, "displayMode": "list", "placement": "bottom"},
        "tooltip": {"mode": "single", "sort": "none"},
    }
    if kind == "state-timeline":
        p["options"]["mergeValues"] = True
        p["options"]["alignValue"] = "left"
    return p


def value_map(pairs):
    """pairs: (value, text, color)"""
    return [
        {
            "type": "value",
            "options": {
                str(v): {"text": text, "color": color, "index": i}
                for i, (v, text, color) in enumerate(pairs)
            },
        }
    ]


def table(title, description, queries, unit="short"):
    p = base("table", title, description, queries, unit, instant=True)
    for t in p["targets"]:
        t["format"] = "table"
    p["options"] = {"showHeader": True, "cellHeight": "sm"}
    p["transformations"] = [
        {
            "id": "organize",
            "options": {"excludeByName": {"Time": True}, "renameByName": {"Value": "count"}},
        }
    ]
    return p


def datasource_var():
    return {
        "type": "datasource",
        "name": "datasource",
        "label": "Data source",
        "query": "prometheus",
        "hide": 0,
        "refresh": 1,
        "skipUrlSync": False,
        "multi": False,
        "includeAll": False,
        "regex": "",
    }


def query_var(name, label, query, multi=True, include_all=True):
    v = {
        "type": "query",
        "name": name,
        "label": label,
        "datasource": DS,
        "query": query,
        "refresh": 2,
        "sort": 1,
        "hide": 0,
        "skipUrlSync": False,
        "multi": multi,
        "includeAll": include_all,
        "regex": "",
    }
    if include_all:
        v["allValue"] = ".*"
    return v


def dashboard(uid, title, description, variables, layout, refresh="30s", time_from="now-3h"):
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["godwit"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": refresh,
        "time": {"from": time_from, "to": "now"},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "templating": {"list": variables},
        # Grafana adds its built-in "Annotations & Alerts" itself.
        "annotations": {"list": []},
        "links": [
            {
                "title": "Godwit dashboards",
                "type": "dashboards",
                "tags": ["godwit"],
                "asDropdown": True,
                "includeVars": True,
                "keepTime": True,
                "icon": "external link",
                "targetBlank": False,
                "tooltip": "",
                "url": "",
            }
        ],
        "panels": layout.panels,
    }


H = '{host=~"$host"}'


def fleet():
    l = Layout()
    l.row("Cluster")
    l.add(
        stat(
            "Agents up",
            "Agents the orchestrator heard from within its agent timeout.",
            [('sum(godwit_orchestrator_agents{state="up"})', "")],
        ),
        4,
        4,
    )
    l.add(
        stat(
            "Agents down",
            "Registered agents the orchestrator has not heard from within its agent timeout.",
            [('sum(godwit_orchestrator_agents{state="down"})', "")],
            steps=thresholds((None, "green"), (1, "red")),
        ),
        4,
        4,
    )
    l.add(stat("VMs", "VMs on the selected hosts' agents.", [(f"sum(godwit_agent_vms{H})", "")]), 4, 4)
    l.add(
        stat(
            "Migrations running",
            "Outgoing migrations running on the selected hosts.",
            [(f'sum(godwit_migrations_in_progress{{role="source",host=~"$host"}})', "")],
        ),
        4,
        4,
    )
    l.add(
        stat(
            "Hot hosts",
            "Hosts the last balancer run found hot.",
            [("godwit_orchestrator_hot_hosts", "")],
            steps=thresholds((None, "green"), (1, "orange")),
        ),
        4,
        4,
    )
    l.add(
        stat(
            "Placement failures",
            "VM creations no host could take, over the dashboard's time range.",
            [("sum(increase(godwit_orchestrator_placement_failures_total[$__range]))", "")],
            steps=thresholds((None, "green"), (1, "red")),
        ),
        4,
        4,
    )
    l.row("Host load")
    l.add(
        bargauge(
            "VM CPU load by host",
            "CPU used by each host's VMs over the last second, as a ratio of all its cores.",
            [(f"godwit_host_vms_cpu_load_ratio{H}", "{{host}}")],
            "percentunit",
            0,
            1,
            thresholds((None, "green"), (0.7, "orange"), (0.85, "red")),
        ),
        8,
        8,
    )
    l.add(
        heatmap(
            "Host load over time",
            "VM CPU load ratio per host (rows) over time: a hot host is a red band.",
            [(f"max by (host) (godwit_host_vms_cpu_load_ratio{H})", "{{host}}")],
            "percentunit",
        ),
        16,
        8,
    )
    l.add(
        timeseries(
            "Imbalance",
            "Spread of host loads: the orchestrator's (VM CPU over each host's configured CPU "
            "capacity, at each balancer run) and the agents' (VM CPU over all cores).",
            [
                ("godwit_orchestrator_imbalance", "orchestrator (balancer view)"),
                ("cluster:godwit_host_vms_cpu_load_ratio:stddev", "agents (all cores)"),
            ],
            "percentunit",
            minimum=0,
        ),
        12,
        8,
    )
    l.add(
        timeseries(
            "Host load as the balancer sees it",
            "VM CPU over each host's CPU capacity, as the orchestrator last sampled it.",
            [(f"godwit_orchestrator_host_load_ratio{H}", "{{host}}")],
            "percentunit",
            minimum=0,
        ),
        12,
        8,
    )
    l.row("Capacity")
    l.add(
        timeseries(
            "VMs per host",
            "VMs on each host's agent.",
            [(f"godwit_agent_vms{H}", "{{host}}")],
            stack=True,
            minimum=0,
        ),
        8,
        8,
    )
    l.add(
        timeseries(
            "Guest memory assigned",
            "Guest memory assigned to VMs, as a ratio of each host's memory.",
            [(f"godwit_host_vm_memory_bytes{H} / godwit_host_memory_bytes{H}", "{{host}}")],
            "percentunit",
            minimum=0,
        ),
        8,
        8,
    )
    l.add(
        timeseries(
            "VM CPU by host (cores)",
            "CPU cores' worth of time the VMs of each host use, next to its cores.",
            [
                ("host:godwit_vm_cpu_seconds:rate1m" + H, "{{host}} VMs"),
                (f"godwit_host_cpu_cores{H}", "{{host}} cores"),
            ],
            minimum=0,
        ),
        8,
        8,
    )
    l.row("Migrations")
    l.add(
        timeseries(
            "Migrations per minute by mode and outcome",
            "Outgoing migrations that ended, per minute, counted by their source agents.",
            [
                (
                    'sum by (mode, outcome) (rate(godwit_migrations_total{role="source",host=~"$host"}'
                    "[$__rate_interval])) * 60",
                    "{{mode}} {{outcome}}",
                )
            ],
            stack=True,
            minimum=0,
        ),
        12,
        8,
    )
    l.add(
        timeseries(
            "Orchestrator migrations per minute",
            "Migrations the orchestrator drove that ended, per minute, by trigger and outcome.",
            [
                (
                    "sum by (trigger, outcome) (rate(godwit_orchestrator_migrations_total"
                    "[$__rate_interval])) * 60",
                    "{{trigger}} {{outcome}}",
                )
            ],
            stack=True,
            minimum=0,
        ),
        12,
        8,
    )
    l.add(
        timeseries(
            "Migration throughput by host",
            "Bytes outgoing migrations write to the network, per second, per source host.",
            [
                (
                    "sum by (host) (rate(godwit_migration_wire_bytes_total{host=~\"$host\"}"
                    "[$__rate_interval]))",
                    "{{host}}",
                )
            ],
            "Bps",
            stack=True,
            minimum=0,
        ),
        12,
        8,
    )
    l.add(
        timeseries(
            "Migrations in progress by phase",
            "Outgoing migrations running, by phase (sampled every second by the agents).",
            [
                (
                    'sum by (phase) (godwit_migrations_in_progress{role="source",host=~"$host"})',
                    "{{phase}}",
                )
            ],
            stack=True,
            minimum=0,
        ),
        12,
        8,
    )
    l.row("Balancer")
    l.add(
        timeseries(
            "Decisions per minute",
            "Decisions the orchestrator recorded, by action and reason class.",
            [
                (
                    "sum by (action, class) (rate(godwit_orchestrator_decisions_total"
                    "[$__rate_interval])) * 60",
                    "{{action}} {{class}}",
                )
            ],
            stack=True,
            minimum=0,
        ),
        12,
        8,
    )
    l.add(
        timeseries(
            "Hotspots detected per minute",
            "Balancer runs that found each host hot, per minute.",
            [
                (
                    "sum by (host) (rate(godwit_orchestrator_hotspots_detected_total{host=~\"$host\"}"
                    "[$__rate_interval])) * 60",
                    "{{host}}",
                )
            ],
            minimum=0,
        ),
        12,
        8,
    )
    l.add(
        timeline(
            "Agents",
            "Whether the orchestrator hears from each host's agent.",
            [(f"godwit_orchestrator_agent_up{H}", "{{host}}")],
            value_map([(0, "down", "red"), (1, "up", "green")]),
        ),
        12,
        8,
    )
    l.add(
        timeseries(
            "Balancer runs",
            "Balancer runs per minute and how long planning takes (99th percentile).",
            [
                ("rate(godwit_orchestrator_balancer_runs_total[$__rate_interval]) * 60", "runs per minute"),
                (
                    "histogram_quantile(0.99, sum by (le) (rate("
                    "godwit_orchestrator_balancer_duration_seconds_bucket[$__rate_interval]))) * 1000",
                    "p99 planning ms",
                ),
            ],
            minimum=0,
        ),
        6,
        8,
    )
    l.add(
        bargauge(
            "Moves in the anti-thrash window",
            "VMs that moved most within the anti-thrash window.",
            [("topk(10, godwit_orchestrator_vm_moves_in_window > 0)", "{{vm}}")],
            "short",
            0,
            None,
            thresholds((None, "green"), (2, "orange"), (3, "red")),
        ),
        6,
        8,
    )
    return dashboard(
        "godwit-fleet",
        "Godwit / Fleet overview",
        "Hosts, load, capacity, migrations and the balancer across a Godwit cluster.",
        [datasource_var(), query_var("host", "Host", "label_values(godwit_agent_up, host)")],
        l,
    )


def phase_expr(selector):
    """One series per VM whose value is its migration's phase (1 setup ... 5 completing)."""
    parts = [
        f'{i + 1} * godwit_migration_phase{{{selector},phase="{p}"}}' for i, p in enumerate(PHASES)
    ]
    return "max by (vm) (" + " or ".join(parts) + ")"


PHASE_MAP = value_map([(i + 1, p, c) for i, (p, c) in enumerate(zip(PHASES, PHASE_COLORS))])


def quantiles(metric, selector, by="mode", qs=(0.5, 0.9, 0.99)):
    return [
        (
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{selector}}}"
            "[$__rate_interval])))",
            f"p{int(q * 100)} {{{{{by}}}}}",
        )
        for q in qs
    ]


def range_quantiles(metric, selector, qs=(0.5, 0.99)):
    return [
        (
            f"histogram_quantile({q}, sum by (le, mode) (increase({metric}_bucket{{{selector}}}"
            "[$__range])))",
            f"p{int(q * 100)} {{{{mode}}}}",
        )
        for q in qs
    ]


def migrations():
    sel = 'host=~"$host",mode=~"$mode"'
    l = Layout()
    l.row("Running migrations")
    l.add(
        timeline(
            "Phase timeline",
            "The phase of each outgoing migration of the selected VMs, as its source agent "
            "sampled it every second.",
            [(phase_expr('role="source",host=~"$host",vm=~"$vm"'), "{{vm}}")],
            PHASE_MAP,
        ),
        24,
        7,
    )
    l.add(
        timeseries(
            "Remaining bytes",
            "Guest memory each running outgoing migration still has to send (best estimate).",
            [('godwit_migration_remaining_bytes{host=~"$host",vm=~"$vm"}', "{{vm}} from {{host}}")],
            "bytes",
            minimum=0,
        ),
        8,
        8,
    )
    l.add(
        timeseries(
            "Throughput per migration",
            "Wire throughput of each running outgoing migration, per second.",
            [
                (
                    'godwit_migration_throughput_bytes_per_second{host=~"$host",vm=~"$vm"}',
                    "{{vm}} from {{host}}",
                )
            ],
            "Bps",
            minimum=0,
        ),
        8,
        8,
    )
    l.add(
        timeseries(
            "Dirty rate of migrating VMs",
            "What the guest dirtied per second in its last pre-copy round (or dirty-log probe).",
            [
                (
                    'godwit_vm_dirty_rate_bytes_per_second{host=~"$host",vm=~"$vm"} '
                    'and on (host, vm) (godwit_vm_migrating{host=~"$host",vm=~"$vm"} == 1)',
                    "{{vm}} on {{host}}",
                )
            ],
            "Bps",
            minimum=0,
        ),
        8,
        8,
    )
    l.add(
        timeseries(
            "In progress by role and phase",
            "Migrations running on the selected hosts, as source and as target.",
            [
                (
                    'sum by (role, phase) (godwit_migrations_in_progress{host=~"$host"})',
                    "{{role}} {{phase}}",
                )
            ],
            stack=True,
            minimum=0,
        ),
        12,
        8,
    )
    l.add(
        timeseries(
            "Started and ended per minute",
            "Migrations started, and ended by outcome, per minute (source side).",
            [
                (
                    'sum by (mode) (rate(godwit_migrations_started_total{role="source",'
                    + sel
                    + "}[$__rate_interval])) * 60",
                    "started {{mode}}",
                ),
                (
                    'sum by (mode, outcome) (rate(godwit_migrations_total{role="source",'
                    + sel
                    + "}[$__rate_interval])) * 60",
                    "{{outcome}} {{mode}}",
                ),
            ],
            minimum=0,
        ),
        12,
        8,
    )
    l.row("Bytes")
    l.add(
        timeseries(
            "Pages sent by kind",
            "Guest pages sent per second, by encoding: zero pages carry no payload, raw pages "
            "4 KiB, compressed pages what zstd left.",
            [
                (
                    f"sum by (kind) (rate(godwit_migration_pages_total{{{sel}}}[$__rate_interval]))",
                    "{{kind}}",
                )
            ],
            "short",
            stack=True,
            minimum=0,
        ),
        8,
        8,
    )
    l.add(
        timeseries(
            "Payload bytes by kind",
            "Page payload sent per second, raw and compressed.",
            [
                (
                    f"sum by (kind) (rate(godwit_migration_payload_bytes_total{{{sel}}}"
                    "[$__rate_interval]))",
                    "{{kind}}",
                )
            ],
            "Bps",
            stack=True,
            minimum=0,
        ),
        8,
        8,
    )
    l.add(
        timeseries(
            "Wire bytes by stage",
            "Everything written to migration sockets per second (headers included), by stage: "
            "pre-copy while the guest runs, downtime while it is paused, post-copy after.",
            [
                (
                    f"sum by (stage) (rate(godwit_migration_wire_bytes_total{{{sel}}}"
                    "[$__rate_interval]))",
                    "{{stage}}",
                )
            ],
            "Bps",
            stack=True,
            minimum=0,
        ),
        8,
        8,
    )
    l.add(
        timeseries(
            "Throughput by mode",
            "Wire bytes per second of outgoing migrations, by mode.",
            [
                (
                    "sum by (mode) (rate(godwit_migration_wire_bytes_total{"
                    + sel
                    + "}[$__rate_interval]))",
                    "{{mode}}",
                )
            ],
            "Bps",
            minimum=0,
        ),
        12,
        8,
    )
    l.add(
        timeseries(
            "Compression ratio",
            "Payload of compressed pages over the 4 KiB they stand for.",
            [
                (
                    'sum(rate(godwit_migration_payload_bytes_total{kind="compressed",'
                    + sel
                    + '}[$__rate_interval])) / (4096 * sum(rate(godwit_migration_pages_total{kind="compressed",'
                    + sel
                    + "}[$__rate_interval])))",
                    "compressed / raw size",
                )
            ],
            "percentunit",
            minimum=0,
        ),
        12,
        8,
    )
    l.row("Times and rounds")
    l.add(
        timeseries(
            "Downtime quantiles",
            "Guest downtime of completed migrations: paused on the source until running on the "
            "target.",
            quantiles("godwit_migration_downtime_seconds", sel),
            "s",
            minimum=0,
        ),
        12,
        8,
    )
    l.add(
        timeseries(
            "Total time quantiles",
            "Time completed migrations took from start to the target's confirmation.",
            quantiles("godwit_migration_duration_seconds", sel),
            "s",
            minimum=0,
        ),
        12,
        8,
    )
    l.add(
        bargauge(
            "Downtime over the range",
            "Median and 99th percentile downtime of the migrations completed in the dashboard's "
            "time range.",
            range_quantiles("godwit_migration_downtime_seconds", sel),
            "s",
            0,
        ),
        8,
        8,
    )
    l.add(
        bargauge(
            "Total time over the range",
            "Median and 99th percentile total time of the migrations completed in the "
            "dashboard's time range.",
            range_quantiles("godwit_migration_duration_seconds", sel),
            "s",
            0,
        ),
        8,
        8,
    )
    l.add(
        timeseries(
            "Pre-copy rounds",
            "Rounds completed migrations needed: median, 90th percentile and mean (0 for "
            "stop-and-copy and post-copy).",
            quantiles("godwit_migration_precopy_rounds", sel, qs=(0.5, 0.9))
            + [
                (
                    f"sum by (mode) (rate(godwit_migration_precopy_rounds_sum{{{sel}}}[$__rate_interval])) "
                    f"/ sum by (mode) (rate(godwit_migration_precopy_rounds_count{{{sel}}}[$__rate_interval]))",
                    "mean {{mode}}",
                )
            ],
            "short",
            minimum=0,
        ),
        8,
        8,
    )
    l.row("Post-copy")
    l.add(
        timeseries(
            "Fault latency quantiles",
            "Post-copy fault service latency on the target, from the guest's fault to the page "
            "installed (recorded when the migration completes).",
            quantiles("godwit_migration_postcopy_fault_latency_seconds", sel),
            "s",
            minimum=0,
        ),
        12,
        8,
    )
    l.add(
        timeseries(
            "Faults per minute",
            "Guest faults on missing pages and page requests to the source, per minute, on the "
            "target hosts.",
            [
                (
                    f"sum by (mode) (rate(godwit_migration_postcopy_faults_total{{{sel}}}"
                    "[$__rate_interval])) * 60",
                    "faults {{mode}}",
                ),
                (
                    f"sum by (mode) (rate(godwit_migration_postcopy_page_requests_total{{{sel}}}"
                    "[$__rate_interval])) * 60",
                    "requests {{mode}}",
                ),
            ],
            minimum=0,
        ),
        12,
        8,
    )
    l.row("Resources")
    hsel = 'host=~"$host"'
    l.add(
        table(
            "Resource actions",
            "What outgoing migrations did with each VM resource in the dashboard's time range: "
            "kind (disk, endpoint, scratch, device), action (move, copy, global_ref, rebind) and "
            "outcome (see docs/resources.md).",
            [
                (
                    "sum by (kind, action, outcome) (increase(godwit_migration_resource_actions_total{"
                    + hsel
                    + "}[$__range])) > 0",
                    "",
                )
            ],
        ),
        8,
        8,
    )
    l.add(
        timeseries(
            "Resource data sent",
            "Disk blocks and scratch files outgoing migrations send (MV and CP), by kind and "
            "action.",
            [
                (
                    "sum by (kind, action) (rate(godwit_migration_resource_bytes_total{"
                    + hsel
                    + "}[$__rate_interval]))",
                    "{{kind}} {{action}}",
                )
            ],
            "Bps",
            minimum=0,
        ),
        8,
        8,
    )
    l.add(
        timeseries(
            "Resource action time",
            "Median and 99th percentile time of completed resource actions, by action (a disk "
            "move from its first block to its last live pass).",
            quantiles("godwit_migration_resource_action_duration_seconds", hsel, by="action", qs=(0.5, 0.99)),
            "s",
            minimum=0,
        ),
        8,
        8,
    )
    l.row("Failures")
    l.add(
        table(
            "Failures by reason",
            "Failed migrations in the dashboard's time range by mode, role and reason class "
            "(see docs/runbook.md).",
            [
                (
                    "sum by (mode, role, reason) (increase(godwit_migration_failures_total{"
                    + sel
                    + "}[$__range])) > 0",
                    "",
                )
            ],
        ),
        12,
        8,
    )
    l.add(
        timeseries(
            "Failure ratio",
            "Share of outgoing migrations that failed, over the last 30 minutes (recording rule).",
            [('host_mode:godwit_migration_failure_ratio:ratio30m{host=~"$host",mode=~"$mode"}', "{{host}} {{mode}}")],
            "percentunit",
            minimum=0,
            maximum=1,
        ),
        12,
        8,
    )
    return dashboard(
        "godwit-migrations",
        "Godwit / Migrations",
        "Live migration detail: phases, bytes by kind, rounds, downtime and total time, "
        "post-copy faults, throughput and failures.",
        [
            datasource_var(),
            query_var("host", "Host", "label_values(godwit_agent_up, host)"),
            query_var("mode", "Mode", "label_values(godwit_migrations_total, mode)"),
            query_var("vm", "VM", 'label_values(godwit_vm_memory_bytes{host=~"$host"}, vm)'),
        ],
        l,
        refresh="10s",
        time_from="now-1h",
    )


def vm():
    v = 'vm="$vm"'
    l = Layout()
    l.row("Where it runs")
    l.add(
        timeline(
            "Where it ran",
            "The host whose agent reported the VM; a move shows as one row ending and another "
            "starting.",
            [(f"count by (host) (godwit_vm_memory_bytes{{{v}}})", "{{host}}")],
            value_map([(1, "here", "green")]),
        ),
        16,
        6,
    )
    l.add(
        stat(
            "Host now",
            "The host running the VM now.",
            [(f"max by (host) (godwit_vm_memory_bytes{{{v}}})", "{{host}}")],
            "bytes",
            text_mode="name",
        ),
        4,
        6,
    )
    l.add(
        stat(
            "Moves in the anti-thrash window",
            "Completed moves within the orchestrator's anti-thrash window.",
            [(f"max(godwit_orchestrator_vm_moves_in_window{{{v}}})", "")],
            steps=thresholds((None, "green"), (2, "orange"), (3, "red")),
        ),
        4,
        6,
    )
    l.add(
        timeline(
            "State",
            "Lifecycle state, and whether a migration of the VM is under way.",
            [
                (
                    f'sum(godwit_vm_state{{{v},state="running"}}) + 2 * sum(godwit_vm_state{{{v},state="paused"}}) '
                    f'+ 3 * sum(godwit_vm_state{{{v},state="crashed"}})',
                    "state",
                ),
                (f"10 + max(godwit_vm_migrating{{{v}}})", "migrating"),
            ],
            value_map(
                [
                    (1, "running", "green"),
                    (2, "paused", "yellow"),
                    (3, "crashed", "red"),
                    (10, "not migrating", "transparent"),
                    (11, "migrating", "blue"),
                ]
            ),
        ),
        24,
        5,
    )
    l.add(
        timeline(
            "Migration phase",
            "Phase of an outgoing migration of the VM, as its source agent sampled it.",
            [(phase_expr(f'role="source",{v}'), "{{vm}}")],
            PHASE_MAP,
        ),
        24,
        4,
    )
    l.row("Resources")
    l.add(
        timeseries(
            "CPU (cores)",
            "CPU time the VM's vCPU threads used per second, by the host it ran on.",
            [(f"sum by (host) (rate(godwit_vm_cpu_seconds_total{{{v}}}[$__rate_interval]))", "{{host}}")],
            minimum=0,
        ),
        8,
        8,
    )
    l.add(
        timeseries(
            "CPU per vCPU",
            "CPU used as a ratio of the VM's vCPUs.",
            [
                (
                    f"sum(rate(godwit_vm_cpu_seconds_total{{{v}}}[$__rate_interval])) "
                    f"/ max(godwit_vm_vcpus{{{v}}})",
                    "busy",
                )
            ],
            "percentunit",
            minimum=0,
        ),
        8,
        8,
    )
    l.add(
        timeseries(
            "Dirty rate",
            "Guest memory dirtied per second, from the agent's periodic dirty-log probe (or the "
            "last pre-copy round while it migrates away).",
            [(f"godwit_vm_dirty_rate_bytes_per_second{{{v}}}", "{{host}}")],
            "Bps",
            minimum=0,
        ),
        8,
        8,
    )
    l.add(
        timeseries(
            "Memory",
            "Guest memory size.",
            [(f"godwit_vm_memory_bytes{{{v}}}", "{{host}}")],
            "bytes",
            minimum=0,
        ),
        12,
        6,
    )
    l.add(
        timeseries(
            "Migration progress",
            "Remaining bytes and throughput of an outgoing migration of the VM.",
            [
                (f"godwit_migration_remaining_bytes{{{v}}}", "remaining from {{host}}"),
                (f"godwit_migration_throughput_bytes_per_second{{{v}}}", "throughput from {{host}}"),
            ],
            "bytes",
            minimum=0,
        ),
        12,
        6,
    )
    return dashboard(
        "godwit-vm",
        "Godwit / VM",
        "One VM: where it ran, its state, CPU, dirty rate, memory and migrations.",
        [
            datasource_var(),
            query_var("vm", "VM", "label_values(godwit_vm_memory_bytes, vm)", multi=False, include_all=False),
        ],
        l,
    )


DASHBOARDS = {
    "godwit-fleet.json": fleet,
    "godwit-migrations.json": migrations,
    "godwit-vm.json": vm,
}


def render(make):
    return json.dumps(make(), indent=2, sort_keys=False) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only check the files are up to date")
    args = ap.parse_args()
    stale = []
    for name, make in DASHBOARDS.items():
        path = OUT / name
        text = render(make)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
        else:
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(
            "generate_dashboards: out of date (run scripts/generate_dashboards.py): " + ", ".join(stale),
            file=sys.stderr,
        )
        return 1
    if args.check:
        print(f"generate_dashboards: {len(DASHBOARDS)} dashboards up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
