#!/usr/bin/env bash
# Main job: set up everything on a fresh machine, then run a long-context
# passkey job on the default model (SmolLM2-135M-Instruct, 8K trained window)
# through mistral.rs with the Q-LLM hook. Extra arguments go to the example,
# e.g. `scripts/run.sh --tokens 2048,6144 --config qllm.toml`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup-mistralrs.sh
scripts/fetch-assets.sh smollm2
cargo build --release -p mistralrs-cli
cargo run --release --example passkey -- \
  --model assets/SmolLM2-135M-Instruct.Q4_1.gguf --tokens 1024,4096 --depths 0.1,0.5,0.9 "$@"
