#!/usr/bin/env bash
# Runs Godwit's whole test suite: unit tests and the end-to-end tests that start real agent
# processes running real KVM guests. Set GODWIT_REQUIRE_KVM=1 to fail (not skip) without KVM.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --workspace --bins
cargo test --release --workspace -- --test-threads="${GODWIT_TEST_THREADS:-2}"
