#!/usr/bin/env bash
# Runs Godwit's whole test suite: unit tests and the end-to-end tests that start real agent
# processes running real KVM guests. Set GODWIT_REQUIRE_KVM=1 to fail (not skip) without KVM.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --workspace --bins
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --release --workspace -- --test-threads="${GODWIT_TEST_THREADS:-2}" 2>&1 | tee "$log" || status=$?
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "Summary: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
