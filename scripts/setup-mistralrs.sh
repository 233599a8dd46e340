#!/usr/bin/env bash
# Materialise the patched mistral.rs crates under vendor/mistralrs.
#
# Takes mistralrs-core and mistralrs-cli at the pinned version from crates.io
# (through cargo, checksum-verified against pinned sha256 sums), copies them to
# vendor/mistralrs/<crate>, and applies patches/*.patch in the order given by
# patches/series. Idempotent: does nothing when the stamp (version, sums and
# patch contents) is unchanged; re-applies from pristine sources otherwise.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="0.8.1"
declare -A CRATE_SHA256=(
  [mistralrs-core]=a2b8b9e5c94491d9ceeded3a30291cb6af6ae74810a5776dd55e3bbb8b3429d4
  [mistralrs-cli]=26bc2a0267ea22fa09eb61c6e78257f58d2704671c9666527ccb91a29275939c
)
VENDOR="$ROOT/vendor/mistralrs"
FETCH="$ROOT/vendor/.fetch"
STAMP="$VENDOR/.stamp"

die() { echo "setup-mistralrs: $*" >&2; exit 1; }

stamp="$(
  {
    echo "$VERSION"
    cat "${BASH_SOURCE[0]}"
    for c in "${!CRATE_SHA256[@]}"; do echo "$c ${CRATE_SHA256[$c]}"; done | sort
    cat "$ROOT/patches/series"
    while read -r p; do
      [ -n "$p" ] && cat "$ROOT/patches/$p"
    done <"$ROOT/patches/series"
  } | sha256sum | cut -d' ' -f1
)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$stamp" ]; then
  echo "setup-mistralrs: vendor/mistralrs is up to date"
  exit 0
fi

# A throw-away manifest makes cargo download (and checksum) the exact crates.
mkdir -p "$FETCH/src"
cat >"$FETCH/Cargo.toml" <<TOML
[package]
name = "qllm-fetch-mistralrs"
version = "0.0.0"
edition = "2021"
publish = false

[workspace]

[dependencies]
$(for c in "${!CRATE_SHA256[@]}"; do echo "$c = \"=$VERSION\""; done | sort)
TOML
: >"$FETCH/src/lib.rs"
cargo fetch --quiet --manifest-path "$FETCH/Cargo.toml" || die "cargo fetch of mistral.rs $VERSION failed"

REGISTRY="${CARGO_HOME:-$HOME/.cargo}/registry"
rm -rf "$VENDOR"
mkdir -p "$VENDOR"
for c in "${!CRATE_SHA256[@]}"; do
  archive="$(ls "$REGISTRY"/cache/*/"$c-$VERSION.crate" 2>/dev/null | head -n1)"
  [ -n "$archive" ] || die "$c-$VERSION.crate is not in the cargo cache"
  sum="$(sha256sum "$archive" | cut -d' ' -f1)"
  [ "$sum" = "${CRATE_SHA256[$c]}" ] || die "$c-$VERSION.crate has sha256 $sum, expected ${CRATE_SHA256[$c]}"
  # Unpack from the verified archive rather than trusting the extracted tree.
  tar -xzf "$archive" -C "$VENDOR"
  mv "$VENDOR/$c-$VERSION" "$VENDOR/$c"
done

# A repository of its own: `git apply` inside our checkout would resolve paths
# against our root and silently skip every file.
git -C "$VENDOR" init -q
git -C "$VENDOR" add -A
git -C "$VENDOR" -c user.name=setup -c user.email=setup@localhost commit -q -m "mistral.rs $VERSION from crates.io"
while read -r p; do
  [ -n "$p" ] || continue
  [ -f "$ROOT/patches/$p" ] || die "patches/series names $p, which does not exist"
  git -C "$VENDOR" apply --whitespace=error-all "$ROOT/patches/$p" ||
    die "patch $p does not apply to mistral.rs $VERSION"
done <"$ROOT/patches/series"
changed="$(git -C "$VENDOR" status --porcelain | wc -l)"
series_len="$(grep -c . "$ROOT/patches/series" || true)"
if [ "$series_len" -gt 0 ] && [ "$changed" -eq 0 ]; then
  die "patches/series lists $series_len patches but nothing changed"
fi

echo "$stamp" >"$STAMP"
echo "setup-mistralrs: applied $(grep -c . "$ROOT/patches/series" || true) patches to mistral.rs $VERSION"
