#!/usr/bin/env python3
"""Offline checks of Godwit's Grafana dashboards and Prometheus rules (Grafana cannot run here).

For every dashboard in grafana/dashboards/:
  * it loads into the Grafana Foundation SDK's Dashboard model (PyPI grafana-foundation-sdk);
    every field survives a round trip through the model (a field the schema does not know is
    dropped by it, so a typo or a misplaced option shows up), and every value has the type the
    model declares (enums included);
  * the structure Grafana needs: unique panel ids, a known panel type, panels on the 24-column
    grid without overlaps, every query on the dashboard's `${datasource}`, refIds unique, every
    `$variable` defined, and `rate`/`irate`/`increase` ranges written `$__rate_interval` (or
    `$__range` for whole-range panels);
  * every PromQL expression parses (`promtool check rules` on a generated rule file, when
    promtool is there) and names only metrics Godwit exports: the families in the given
    `/metrics` outputs (--metrics, saved from a real agent and orchestrator), their histogram
    series, the recording rules' outputs and Prometheus' own `up`; with --prometheus, every
    expression also runs against that server without error.

For the rule files in grafana/prometheus/rules/: the same metric-name check on every expression,
and every alert has a summary and a runbook_url whose section exists in docs/runbook.md.

Exit status: 0 all good, 1 problems found (listed), 2 usage error, 3 the SDK is not installed
(unless --allow-missing-sdk).

    scripts/check_dashboards.py --metrics agent.txt --metrics orchestrator.txt
    scripts/check_dashboards.py --self-test   # proves the checks catch what they should
"""

import argparse
import enum
import json
import re
import shutil
import subprocess
import sys
import tempfile
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "grafana" / "dashboards"
RULES = ROOT / "grafana" / "prometheus" / "rules"
RUNBOOK = ROOT / "docs" / "runbook.md"

EXIT_PROBLEMS = 1
EXIT_NO_SDK = 3

# Series Prometheus itself adds to every scrape or evaluation.
PROMETHEUS_SERIES = {
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
    "ALERTS",
    "ALERTS_FOR_STATE",
}
GRAFANA_BUILTINS = {
    "__rate_interval",
    "__interval",
    "__interval_ms",
    "__range",
    "__range_s",
    "__range_ms",
    "__from",
    "__to",
    "__dashboard",
    "__name",
    "__org",
    "__user",
    "__timeFilter",
}
PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
    "atan2",
    "inf",
    "nan",
    "Inf",
    "NaN",
}
# Values for a syntax check: variables replaced by something PromQL accepts.
SUBSTITUTIONS = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}


class Problems:
    def __init__(self):
        self.items = []

    def add(self, where, message):
        self.items.append(f"{where}: {message}")


# ---------------------------------------------------------------------------------------------
# PromQL


def strip_strings(expr):
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)


def metric_names(expr):
    """The metric names a PromQL expression selects (bare names and `name{...}`)."""
    e = strip_strings(expr)
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges and subqueries
    # Label lists of grouping and matching modifiers.
    e = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e
    )
    names = set()
    for m in re.finditer(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word in PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def label_values_selector(query):
    """For a `label_values(selector, label)` variable query, the selector; else the query."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_]\w*\s*\)\s*", query, re.S)
    if m:
        return m.group(1)
    m = re.fullmatch(r"\s*label_values\(\s*[A-Za-z_]\w*\s*\)\s*", query)
    if m:
        return ""
    return query


def variables_in(text):
    """Grafana variables a text uses: $name, ${name}, ${name:format}, [[name]]."""
    found = re.findall(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", text)
    return {a or b or c for a, b, c in found}


def substitute(expr):
    def repl(m):
        name = m.group(1) or m.group(2)
        return SUBSTITUTIONS.get(name, ".*")

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr)


def check_ranges(expr, where, problems):
    """rate/irate/increase over a range written $__rate_interval (or $__range)."""
    for m in re.finditer(r"\b(rate|irate|increase)\s*\(", expr):
        depth, i = 1, m.end()
        while i < len(expr) and depth:
            depth += {"(": 1, ")": -1}.get(expr[i], 0)
            i += 1
        inner = expr[m.end() : i - 1]
        ranges = re.findall(r"\[([^\]]*)\]", inner)
        for r in ranges:
            if r.strip() not in ("$__rate_interval", "$__range", "${__rate_interval}", "${__range}"):
                problems.add(where, f"{m.group(1)}() over [{r}]: use [$__rate_interval] (or [$__range])")


def promtool_syntax(exprs, promtool, problems):
    """Parses each (where, expr) with Prometheus' own parser via `promtool check rules`."""
    with tempfile.TemporaryDirectory() as tmp:
        for i, (where, expr) in enumerate(exprs):
            path = Path(tmp) / f"expr{i}.yml"
            path.write_text(
                json.dumps(
                    {"groups": [{"name": "check", "rules": [{"record": "godwit_check:expr", "expr": substitute(expr)}]}]}
                )
            )
        # One promtool call for all files; its output names the failing file.
        files = sorted(Path(tmp).glob("expr*.yml"), key=lambda p: int(p.stem[4:]))
        if not files:
            return
        out = subprocess.run(
            [promtool, "check", "rules", *map(str, files)], capture_output=True, text=True
        )
        if out.returncode == 0:
            return
        text = out.stdout + out.stderr
        for i, (where, expr) in enumerate(exprs):
            name = f"expr{i}.yml"
            m = re.search(re.escape(name) + r"[^\n]*\n(?:.*\n)*?\s*FAILED:\n((?:.+\n?)+?)(?:\n|$)", text)
            if m:
                problems.add(where, f"PromQL does not parse: {m.group(1).strip()} (in {expr!r})")
        if not any("PromQL" in p for p in problems.items):
            problems.add("promtool", text.strip())


# ---------------------------------------------------------------------------------------------
# The exported metric set


def exported_metrics(paths):
    """Metric families (with their histogram/summary series) from /metrics outputs."""
    names = set()
    for path in paths:
        types = {}
        helps = set()
        for line in Path(path).read_text().splitlines():
            if line.startswith("# HELP "):
                helps.add(line.split()[2])
            elif line.startswith("# TYPE "):
                _, _, name, kind = line.split(maxsplit=3)
                types[name] = kind
        for name in helps | set(types):
            names.add(name)
            if types.get(name) == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            if types.get(name) == "summary":
                names |= {f"{name}_sum", f"{name}_count"}
    return names


def load_rules(paths):
    """(group files' rules, recording rule names)."""
    import yaml  # PyYAML; installed with the SDK by scripts/setup-observability.sh

    rules = []
    for path in paths:
        doc = yaml.safe_load(Path(path).read_text()) or {}
        for group in doc.get("groups", []):
            for rule in group.get("rules", []):
                rules.append((Path(path).name, group.get("name", "?"), rule))
    return rules, {r["record"] for _, _, r in rules if "record" in r}


def runbook_anchors():
    """GitHub-style anchors of docs/runbook.md's headings."""
    if not RUNBOOK.exists():
        return set()
    anchors = set()
    for line in RUNBOOK.read_text().splitlines():
        m = re.match(r"#+\s+(.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


# ---------------------------------------------------------------------------------------------
# The SDK model


def load_sdk():
    try:
        from grafana_foundation_sdk.cog import encoder, plugins, runtime
        from grafana_foundation_sdk.models import dashboard
    except ImportError:
        return None
    plugins.register_default_plugins()
    return {"encoder": encoder, "runtime": runtime, "dashboard": dashboard}


def same(a, b):
    """Equal JSON values; true and 1 are not the same (Grafana reads them differently)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def subset(orig, enc, where, problems):
    """Every field of `orig` is in `enc` with the same value."""
    if isinstance(orig, dict):
        if not isinstance(enc, dict):
            problems.add(where, f"became {type(enc).__name__} in the model")
            return
        for k, v in orig.items():
            if k not in enc:
                problems.add(f"{where}.{k}", "not a field of Grafana's dashboard schema (the SDK model drops it)")
            else:
                subset(v, enc[k], f"{where}.{k}", problems)
    elif isinstance(orig, list):
        if not isinstance(enc, list) or len(enc) != len(orig):
            problems.add(where, "list changed in the model")
            return
        for i, (a, b) in enumerate(zip(orig, enc)):
            subset(a, b, f"{where}[{i}]", problems)
    elif not same(orig, enc):
        problems.add(where, f"value {orig!r} became {enc!r} in the model")


def type_ok(value, ann, where, problems, seen):
    """Checks `value` against the SDK's type annotation `ann`, recursing into model objects."""
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if ann is typing.Any or ann is object:
        # Panel options and field config are typed `object` but hold the panel type's model.
        if hasattr(type(value), "from_json") and hasattr(value, "to_json"):
            model_ok(value, where, problems, seen)
        return True
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return True
        for a in args:
            if a is type(None):
                continue
            trial = Problems()
            if type_ok(value, a, where, trial, seen):
                # The value is this alternative; what is wrong inside it still counts.
                problems.items += trial.items
                return True
        problems.add(where, f"{value!r:.60} is none of {[getattr(a, '__name__', str(a)) for a in args]}")
        return False
    if origin is typing.Literal:
        if value in args:
            return True
        problems.add(where, f"{value!r} is not one of {list(args)}")
        return False
    if origin is list:
        if not isinstance(value, list):
            problems.add(where, f"expected a list, got {type(value).__name__}")
            return False
        return all(type_ok(v, args[0], f"{where}[{i}]", problems, seen) for i, v in enumerate(value)) if args else True
    if origin is dict:
        if not isinstance(value, dict):
            problems.add(where, f"expected an object, got {type(value).__name__}")
            return False
        return True
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        members = [m.value for m in ann]
        if isinstance(value, ann) or value in members:
            return True
        problems.add(where, f"{value!r} is not one of {members}")
        return False
    if ann is bool:
        ok = isinstance(value, bool)
    elif ann is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif ann is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif ann is str:
        ok = isinstance(value, str)
    elif isinstance(ann, type) and hasattr(ann, "from_json"):
        if isinstance(value, dict):
            # Some fields (a panel's transformations) stay plain JSON in the model: read them
            # as the model they are declared to be, then check that.
            try:
                value = ann.from_json(value)
            except Exception as e:  # noqa: BLE001 - any failure means it is not that model
                problems.add(where, f"does not read as a {ann.__name__}: {e}")
                return False
        ok = isinstance(value, ann)
        if ok:
            model_ok(value, where, problems, seen)
    elif isinstance(ann, type):
        ok = isinstance(value, ann)
    else:
        return True  # an annotation this check does not understand
    if not ok:
        problems.add(where, f"{value!r:.60} is not a {getattr(ann, '__name__', ann)}")
    return ok


def model_ok(obj, where, problems, seen):
    if id(obj) in seen:
        return
    seen.add(id(obj))
    try:
        hints = typing.get_type_hints(type(obj))
    except Exception:  # forward references the SDK cannot resolve: skip this object
        return
    for field, ann in hints.items():
        if hasattr(obj, field):
            type_ok(getattr(obj, field), ann, f"{where}.{field}", problems, seen)


def sdk_check(data, name, sdk, problems):
    model = sdk["dashboard"].Dashboard.from_json(data)
    encoded = json.loads(json.dumps(model, cls=sdk["encoder"].JSONEncoder))
    subset(data, encoded, name, problems)
    model_ok(model, name, problems, set())
    return set(sdk["runtime"].Runtime().panelcfg_variants) | {"row"}


# ---------------------------------------------------------------------------------------------
# Dashboards


def check_dashboard(path, known, sdk, problems, exprs):
    name = path.name
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        problems.add(name, f"not JSON: {e}")
        return
    panel_types = sdk_check(data, name, sdk, problems) if sdk else None

    for field, kind in [("uid", str), ("title", str), ("schemaVersion", int), ("panels", list), ("templating", dict)]:
        if not isinstance(data.get(field), kind):
            problems.add(name, f"needs {field} ({kind.__name__})")
    uid = data.get("uid", "")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", str(uid)):
        problems.add(name, f"uid {uid!r} must be 1-40 of A-Z a-z 0-9 _ -")
    if "godwit" not in data.get("tags", []):
        problems.add(name, "needs the tag godwit (the dashboards link each other by it)")

    variables = {}
    for v in data.get("templating", {}).get("list", []):
        variables[v.get("name")] = v
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.add(name, "needs a `datasource` variable of type datasource for Prometheus")
    defined = set(variables) | GRAFANA_BUILTINS

    def check_text(text, where):
        for var in variables_in(text):
            if var not in defined:
                problems.add(where, f"${var} is not a dashboard variable")

    for vname, v in variables.items():
        where = f"{name} variable {vname}"
        if v.get("type") == "query":
            if v.get("datasource") != {"type": "prometheus", "uid": "${datasource}"}:
                problems.add(where, "must query ${datasource}")
            query = v.get("query")
            query = query.get("query", "") if isinstance(query, dict) else (query or "")
            selector = label_values_selector(query)
            check_text(query, where)
            for metric in metric_names(selector):
                if metric not in known:
                    problems.add(where, f"queries {metric}, which Godwit does not export")
            if selector:
                exprs.append((where, selector))

    ids = set()
    boxes = []
    for p in data.get("panels", []):
        title = p.get("title", "?")
        where = f"{name} panel {title!r}"
        pid = p.get("id")
        if not isinstance(pid, int) or pid in ids:
            problems.add(where, f"id {pid!r} is missing or not unique")
        ids.add(pid)
        kind = p.get("type")
        if panel_types is not None and kind not in panel_types:
            problems.add(where, f"type {kind!r} is not a Grafana panel type the SDK knows")
        g = p.get("gridPos", {})
        if not all(isinstance(g.get(k), int) and g.get(k) >= 0 for k in "hwxy"):
            problems.add(where, f"gridPos {g} needs non-negative integers h, w, x, y")
            continue
        if g["w"] < 1 or g["h"] < 1 or g["x"] + g["w"] > 24:
            problems.add(where, f"gridPos {g} does not fit the 24-column grid")
        for other, og in boxes:
            if (
                g["x"] < og["x"] + og["w"]
                and og["x"] < g["x"] + g["w"]
                and g["y"] < og["y"] + og["h"]
                and og["y"] < g["y"] + g["h"]
            ):
                problems.add(where, f"overlaps panel {other!r}")
        boxes.append((title, g))
        check_text(title, where)
        if kind == "row":
            if p.get("panels"):
                problems.add(where, "collapsed rows hide panels from these checks; keep rows open")
            continue
        if not p.get("description"):
            problems.add(where, "needs a description (Grafana shows it as the panel's help)")
        if p.get("datasource") != {"type": "prometheus", "uid": "${datasource}"}:
            problems.add(where, "datasource must be {type: prometheus, uid: ${datasource}}")
        refs = set()
        targets = p.get("targets") or []
        if not targets:
            problems.add(where, "has no queries")
        for t in targets:
            ref = t.get("refId")
            if not ref or ref in refs:
                problems.add(where, f"refId {ref!r} missing or repeated")
            refs.add(ref)
            if t.get("datasource", p.get("datasource")) != p.get("datasource"):
                problems.add(where, f"query {ref} uses another datasource than its panel")
            expr = t.get("expr", "")
            if not expr.strip():
                problems.add(where, f"query {ref} has no expr")
                continue
            qwhere = f"{where} query {ref}"
            check_text(expr, qwhere)
            check_text(t.get("legendFormat", ""), qwhere)
            check_ranges(expr, qwhere, problems)
            for metric in metric_names(expr):
                if metric not in known:
                    problems.add(qwhere, f"queries {metric}, which Godwit does not export")
            exprs.append((qwhere, expr))


def check_rules(rules, known, problems, exprs):
    anchors = runbook_anchors()
    for file, group, rule in rules:
        label = rule.get("record") or rule.get("alert") or "?"
        where = f"{file} {group}/{label}"
        expr = str(rule.get("expr", ""))
        for metric in metric_names(expr):
            if metric not in known:
                problems.add(where, f"uses {metric}, which Godwit does not export")
        exprs.append((where, expr))
        if "record" in rule and not re.fullmatch(r"[a-z_]+:godwit_\w+:\w+", rule["record"]):
            problems.add(where, "recording rules are named level:godwit_metric:operations")
        if "alert" in rule:
            ann = rule.get("annotations", {})
            if not ann.get("summary"):
                problems.add(where, "alert needs a summary annotation")
            url = ann.get("runbook_url", "")
            m = re.fullmatch(r"docs/runbook\.md#([\w-]+)", url)
            if not m:
                problems.add(where, f"runbook_url {url!r} must be docs/runbook.md#<section>")
            elif m.group(1) not in anchors:
                problems.add(where, f"docs/runbook.md has no section #{m.group(1)}")


def live_queries(exprs, url, problems):
    """Runs every expression against a live Prometheus; returns how many gave data."""
    import urllib.error
    import urllib.parse
    import urllib.request

    with_data = 0
    for where, expr in exprs:
        query = urllib.parse.urlencode({"query": substitute(expr)})
        try:
            with urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as e:
            body = json.load(e)
        except (OSError, ValueError) as e:
            problems.add(where, f"Prometheus at {url} did not answer: {e}")
            continue
        if body.get("status") != "success":
            problems.add(where, f"Prometheus rejected the query: {body.get('error')}")
        elif body["data"].get("result"):
            with_data += 1
    return with_data


def run(dashboards, rule_files, metric_files, promtool, sdk, prometheus=None):
    problems = Problems()
    rules, recorded = load_rules(rule_files)
    known = exported_metrics(metric_files) | recorded | PROMETHEUS_SERIES
    exported = exported_metrics(metric_files)
    if not exported:
        problems.add("metrics", "no metric families given (--metrics): nothing to check names against")
    exprs = []
    paths = sorted(Path(dashboards).glob("*.json"))
    if not paths:
        problems.add(str(dashboards), "no dashboards")
    for path in paths:
        check_dashboard(path, known, sdk, problems, exprs)
    check_rules(rules, known, problems, exprs)
    if promtool:
        promtool_syntax(exprs, promtool, problems)
    live = live_queries(exprs, prometheus, problems) if prometheus else None
    return problems, len(paths), len(exprs), live


# ---------------------------------------------------------------------------------------------
# Self-test: the checks catch what they are for.


def self_test(promtool, sdk):
    good_metrics = "# HELP godwit_a_total A.\n# TYPE godwit_a_total counter\ngodwit_a_total 1\n"
    ds = {"type": "prometheus", "uid": "${datasource}"}

    def dash(panel_extra, expr, var_query="label_values(godwit_a_total, host)"):
        panel = {
            "id": 1,
            "type": "timeseries",
            "title": "t",
            "description": "d",
            "datasource": ds,
            "gridPos": {"h": 4, "w": 12, "x": 0, "y": 0},
            "targets": [{"refId": "A", "datasource": ds, "expr": expr}],
        }
        panel.update(panel_extra)
        return {
            "uid": "t",
            "title": "t",
            "tags": ["godwit"],
            "schemaVersion": 39,
            "templating": {
                "list": [
                    {"type": "datasource", "name": "datasource", "query": "prometheus"},
                    {"type": "query", "name": "host", "datasource": ds, "query": var_query},
                ]
            },
            "panels": [panel],
        }

    cases = [
        ("clean", dash({}, 'sum by (host) (rate(godwit_a_total{host=~"$host"}[$__rate_interval]))'), None),
        ("unknown metric", dash({}, "rate(godwit_b_total[$__rate_interval])"), "godwit_b_total, which Godwit does not export"),
        ("unknown metric in a variable", dash({}, "godwit_a_total", "label_values(godwit_c, host)"), "godwit_c, which"),
        ("fixed rate range", dash({}, "rate(godwit_a_total[5m])"), "use [$__rate_interval]"),
        ("undefined variable", dash({}, 'godwit_a_total{vm="$vm"}'), "$vm is not a dashboard variable"),
        ("bad grid", dash({"gridPos": {"h": 4, "w": 20, "x": 10, "y": 0}}, "godwit_a_total"), "24-column grid"),
    ]
    if sdk:
        cases += [
            ("unknown field", dash({"gridpos": {}}, "godwit_a_total"), "not a field of Grafana's dashboard schema"),
            ("bad enum", dash({"options": {"legend": {"displayMode": "sideways"}}}, "godwit_a_total"), "'sideways' is not one of"),
            ("unknown panel type", dash({"type": "timeserie"}, "godwit_a_total"), "not a Grafana panel type"),
        ]
    if promtool:
        cases.append(("bad PromQL", dash({}, "sum by (host (godwit_a_total)"), "does not parse"))
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "metrics.txt"
        metrics.write_text(good_metrics)
        for label, d, expected in cases:
            ddir = Path(tmp) / label.replace(" ", "_")
            ddir.mkdir()
            (ddir / "d.json").write_text(json.dumps(d))
            problems, _, _, _ = run(ddir, [], [metrics], promtool, sdk)
            text = "\n".join(problems.items)
            if expected is None and problems.items:
                failed.append(f"{label}: expected no problems, got:\n{text}")
            elif expected is not None and expected not in text:
                failed.append(f"{label}: expected a problem containing {expected!r}, got:\n{text or '(none)'}")
    names = metric_names('sum by (le, mode) (rate(a_bucket{x="y"}[5m])) / on (mode) group_left(z) b or c > bool 0')
    if names != {"a_bucket", "b", "c"}:
        failed.append(f"metric_names: {names}")
    for f in failed:
        print(f"self-test FAILED {f}", file=sys.stderr)
    print(f"check_dashboards self-test: {len(cases) - len(failed)} of {len(cases)} cases caught as expected")
    return 1 if failed else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dashboards", default=DASHBOARDS, type=Path, help="directory of dashboard JSON files")
    ap.add_argument(
        "--rules",
        action="append",
        type=Path,
        help="Prometheus rule file (repeatable; default: grafana/prometheus/rules/*.yml without *_test.yml)",
    )
    ap.add_argument("--metrics", action="append", default=[], type=Path, help="a saved /metrics output (repeatable)")
    ap.add_argument("--promtool", default=shutil.which("promtool"), help="promtool for the PromQL syntax check")
    ap.add_argument("--no-promtool", action="store_true", help="skip the PromQL syntax check")
    ap.add_argument(
        "--prometheus",
        metavar="URL",
        help="also run every expression against this Prometheus (variables filled with .*)",
    )
    ap.add_argument("--allow-missing-sdk", action="store_true", help="without the SDK, run the other checks")
    ap.add_argument("--self-test", action="store_true", help="check that the checks catch known mistakes")
    args = ap.parse_args()
    promtool = None if args.no_promtool else args.promtool
    sdk = load_sdk()
    if sdk is None:
        msg = "grafana-foundation-sdk is not installed (pip install grafana-foundation-sdk)"
        if not args.allow_missing_sdk:
            print(f"check_dashboards: {msg}", file=sys.stderr)
            return EXIT_NO_SDK
        print(f"check_dashboards: warning: {msg}; schema checks from the model skipped", file=sys.stderr)
    if not promtool:
        print("check_dashboards: warning: no promtool; PromQL syntax not checked", file=sys.stderr)
    if args.self_test:
        return self_test(promtool, sdk)
    rules = args.rules or sorted(p for p in RULES.glob("*.yml") if not p.name.endswith("_test.yml"))
    problems, n_dash, n_expr, live = run(
        args.dashboards, rules, args.metrics, promtool, sdk, args.prometheus
    )
    for p in problems.items:
        print(f"check_dashboards: {p}", file=sys.stderr)
    if problems.items:
        print(f"check_dashboards: {len(problems.items)} problems", file=sys.stderr)
        return EXIT_PROBLEMS
    live_text = f", {live} of them returned data from {args.prometheus}" if live is not None else ""
    print(
        f"check_dashboards: {n_dash} dashboards, {len(rules)} rule files, {n_expr} expressions: all "
        f"metrics exported{', PromQL parses' if promtool else ''}{', SDK model ok' if sdk else ''}"
        f"{live_text}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
