#!/usr/bin/env bash
# Agent restart time with N VMs (default 10): create them, kill -9 the agent, start it again on the
# same data directory, and time until it answers and until it lists them all running; 3 times.
# Then the resident memory of each VMM and of the agent, and the time of a VM call through it.
# Needs a release build (cargo build --release --bins), curl and python3. Leaves nothing behind.
set -euo pipefail
BIN=${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release}
N=${N:-10}
D=$(mktemp -d /tmp/rb.XXXX)
PORT=${PORT:-7391}
pid=0
cleanup() {
    kill -9 "$pid" 2>/dev/null || true
    for f in "$D"/vms/*/vmm.pid; do [[ -f $f ]] && kill -9 "$(cat "$f")" 2>/dev/null || true; done
    rm -rf "$D"
}
trap cleanup EXIT
start() { "$BIN/hypervisor-agent" --listen 127.0.0.1:$PORT --name rb --data-dir "$D" --dirty-probe-interval-s 0 --insecure >/dev/null 2>>"$D/agent.log" & echo $!; }
wait_up() { until curl -sf localhost:$PORT/healthz >/dev/null; do sleep 0.005; done; }
pid=$(start); wait_up
for i in $(seq 1 $N); do
  case $((i % 3)) in
    0) g='{"kind":"dirty","working_set_mib":16,"rate_mib_s":5}';;
    1) g='{"kind":"spin","duty_percent":5}';;
    2) g='{"kind":"idle"}';;
  esac
  t0=$(date +%s%N)
  curl -sf -XPOST localhost:$PORT/v1/vms -d "{\"name\":\"vm$i\",\"memory_mib\":64,\"guest\":$g}" >/dev/null
  t1=$(date +%s%N); echo "create vm$i: $(( (t1-t0)/1000 )) us"
done
sleep 2
for run in 1 2 3; do
  kill -9 $pid; sleep 0.5
  t0=$(date +%s%N)
  pid=$(start); wait_up
  t1=$(date +%s%N)
  n=$(curl -sf localhost:$PORT/v1/vms | python3 -c 'import json,sys; v=json.load(sys.stdin); print(sum(1 for x in v if x["state"]=="running"))')
  t2=$(date +%s%N)
  echo "restart $run: healthy after $(( (t1-t0)/1000000 )) ms, $n running VMs listed after $(( (t2-t0)/1000000 )) ms"
done
for f in "$D"/vms/*/vmm.pid; do p=$(cat $f); echo "$(basename $(dirname $f)) $(grep -E "VmRSS|RssAnon|RssFile|RssShmem" /proc/$p/status | tr -s " \t\n" " ")"; done
for i in 1 2 3; do t0=$(date +%s%N); curl -sf localhost:$PORT/v1/vms >/dev/null; t1=$(date +%s%N); echo "GET /v1/vms: $(( (t1-t0)/1000 )) us"; done
for i in 1 2 3; do t0=$(date +%s%N); curl -sf localhost:$PORT/v1/vms/vm1 >/dev/null; t1=$(date +%s%N); echo "GET /v1/vms/vm1: $(( (t1-t0)/1000 )) us"; done
grep -E "VmRSS" /proc/$pid/status
