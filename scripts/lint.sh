#!/usr/bin/env bash
# Formatting and clippy, on this crate and on the patched mistral.rs crates.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup-mistralrs.sh
cargo fmt -p qllm --check
# rustfmt on every file the patches touch, with upstream's (default) settings.
grep -h '^+++ b/' patches/*.patch | sed 's|^+++ b/||' | grep '\.rs$' | sort -u |
  while read -r f; do rustfmt --edition 2021 --check "vendor/mistralrs/$f"; done
cargo clippy --release -p qllm -p mistralrs-core -p mistralrs-cli --all-targets -- -D warnings
