#!/usr/bin/env bash
# Speed and memory of `upstream` (mistral.rs without the hook), `dense` and
# `qllm` on the default model: one process per (mode, length), passkey prompt
# with the key at 50%, 32 new tokens. Prints and appends to results/bench.tsv:
# mode, prompt tokens, prefill tok/s, decode tok/s, peak RSS (MiB).
#
#   scripts/bench.sh [LENGTHS] [MODES] [extra passkey args...]
#   scripts/bench.sh 2048,4096,8192 upstream,dense,qllm
#   scripts/bench.sh 16384,32768 qllm
set -euo pipefail
cd "$(dirname "$0")/.."
lengths=${1:-2048,4096,8192}
modes=${2:-upstream,dense,qllm}
shift $(( $# > 2 ? 2 : $# ))
scripts/setup-mistralrs.sh
scripts/fetch-assets.sh smollm2 >/dev/null
cargo build --release --example passkey
mkdir -p results
out=results/bench.tsv
[ -s "$out" ] || printf 'date\tmode\ttokens\tprefill_tok_s\tdecode_tok_s\tpeak_rss_mib\tfound\targs\n' > "$out"
for mode in ${modes//,/ }; do
  for n in ${lengths//,/ }; do
    log=$(target/release/examples/passkey --mode "$mode" --tokens "$n" --depths 0.5 \
            --max-new-tokens 32 "$@" 2>/dev/null) || { echo "$mode $n: failed" >&2; continue; }
    row=$(grep -P "^$mode\t" <<<"$log" | head -1)
    rss=$(grep -P '^peak_rss_mib\t' <<<"$log" | cut -f2)
    IFS=$'\t' read -r _ tokens _ _ _ found prefill decode _ <<<"$row"
    line=$(printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s' "$(date -u +%FT%TZ)" "$mode" "$tokens" "$prefill" "$decode" "$rss" "$found" "$*")
    echo "$line" | tee -a "$out"
  done
done
