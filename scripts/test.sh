#!/usr/bin/env bash
# The project's test command (README, .ci/run): system packages, style, lints, the default
# guest image and its checks, then every test. Tests that need something this machine lacks
# (KVM, hardware virtualization) print a SKIP line with the reason; they are listed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
log=$(mktemp "${TMPDIR:-/tmp}/lodge-test.XXXXXX")
trap 'rm -f "$log"' EXIT

step "system packages"
scripts/install-deps.sh

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "default guest image (guest/test.sh: builds it on first use, ~5 minutes)"
bash guest/test.sh

step "cargo test"
# --show-output keeps the SKIP lines (and guest consoles) of passing tests in the log.
cargo test --workspace --locked -- --show-output 2>&1 | tee "$log"

step "skipped"
grep -h '^SKIP' "$log" | sort -u || echo "nothing skipped"
