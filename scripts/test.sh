#!/usr/bin/env bash
# Set up everything on a fresh machine and run the whole test suite:
# patched mistral.rs, model assets, the release `mistralrs` CLI, then the tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup-mistralrs.sh
scripts/fetch-assets.sh smollm2 qwen15b essays hotpotqa jargon
cargo fmt -p qllm --check
# Tests run in release: the CLI build and the test build share one build of
# mistral.rs, and model runs in debug builds are far too slow.
cargo build --release -p mistralrs-cli
# The patched core's own unit tests of the series (0012, 0013, 0014).
cargo test --release -p mistralrs-core --lib -- default_scheduler sequence::tests
# The hook's doctest (patch 0002).
cargo test --release -p mistralrs-core --doc -- attention::hook
# The rooms that need only candle build without the engine.
cargo build --release -p qllm --lib --no-default-features
cargo test --release -p qllm
