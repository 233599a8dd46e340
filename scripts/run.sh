#!/usr/bin/env bash
# Main job: set up everything on a fresh machine, then run a long-context
# passkey job on the default model (SmolLM2-135M-Instruct, 8K trained window)
# through mistral.rs with the Q-LLM hook. Extra arguments go to the example,
# e.g. `scripts/run.sh --tokens 2048,6144 --config qllm.toml`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup-mistralrs.sh
scripts/fetch-assets.sh smollm2
# Q-LLM (`1k` preset) on prompts twice the model's trained window (8192), key
# at 10%, 50% and 90%; weights dequantized to f32 (3x faster prefill here).
# Any passkey flag given here overrides these (e.g. --tokens 32768 --mode infllm).
cargo run --release --example passkey -- --dequantize \
  --model assets/SmolLM2-135M-Instruct.Q4_1.gguf --mode qllm --tokens 16384 --depths 0.1,0.5,0.9 "$@"
