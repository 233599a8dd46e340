#!/usr/bin/env bash
# Formatting and clippy, on this crate and on the patched mistral.rs crates.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup-mistralrs.sh
cargo fmt -p qllm --check
# rustfmt on every file the patches touch, with upstream's (default) settings.
grep -h '^+++ b/' patches/*.patch | sed 's|^+++ b/||' | grep '\.rs$' | sort -u |
  while read -r f; do rustfmt --edition 2021 --check "vendor/mistralrs/$f"; done
cargo clippy --release -p qllm --all-targets -- -D warnings
cargo clippy --release -p mistralrs-core -- -D warnings
# Upstream's own `run_interactive` (8 arguments) trips this lint with current clippy.
cargo clippy --release -p mistralrs-cli -- -D warnings -A clippy::too_many_arguments
