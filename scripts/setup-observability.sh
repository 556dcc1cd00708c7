#!/usr/bin/env bash
# Makes sure this machine has what Godwit's observability checks use: Debian's `prometheus`
# package (the prometheus server and promtool) and, from PyPI, grafana-foundation-sdk and PyYAML
# for scripts/check_dashboards.py. Installs what is missing when run as root; otherwise says what
# to install. The real-Prometheus test (tests/tests/prometheus.rs) runs it; safe to run again.
# Exit status: 0 when everything is there afterwards, 1 when something is still missing.
set -uo pipefail

SDK="grafana-foundation-sdk==1769699998!10.1.0"
python=${PYTHON:-python3}
root=false
[[ $(id -u) -eq 0 ]] && root=true
missing=()

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    if $root && command -v apt-get >/dev/null; then
        echo "setup-observability: installing Debian's prometheus package"
        # Where systemd runs, the package starts its own service; the tests run their own
        # server on a free loopback port, so the two do not meet.
        apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    fi
    if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
        missing+=("prometheus (apt-get install prometheus)")
    fi
fi

has_python_deps() {
    "$python" -c 'import grafana_foundation_sdk, yaml' 2>/dev/null
}
if ! command -v "$python" >/dev/null; then
    missing+=("python3")
elif ! has_python_deps; then
    if $root; then
        echo "setup-observability: installing $SDK and PyYAML from PyPI"
        "$python" -m pip install -q --disable-pip-version-check --root-user-action=ignore "$SDK" pyyaml
    fi
    has_python_deps || missing+=("python packages ($python -m pip install '$SDK' pyyaml)")
fi

if ((${#missing[@]})); then
    printf 'setup-observability: missing %s\n' "${missing[@]}" >&2
    exit 1
fi
