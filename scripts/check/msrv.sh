#!/usr/bin/env bash
# Builds filevol and runs its unit tests with the oldest toolchain it
# promises to build with: `rust-version` in Cargo.toml, which is what Debian
# 13 ships (rustc 1.85) and what Debian 12's main archive has as rustc-web
# and cargo-web. Those are installed here at that exact version (bookworm's
# security archive carries newer ones, which apt would prefer) and used by
# path, beside whatever rustup provides; the build goes to target/msrv so it
# never mixes with the other toolchain's. Where the distribution's newer
# rustc-web is the only toolchain, it is downgraded to this one, which
# builds everything else too.
#
# Only on Debian 12, where that toolchain is packaged. Elsewhere it says
# NOT RUN, and under CI (CI=true) that is a failure.
set -euo pipefail
cd "$(dirname "$0")/../.."

deb_version=1.85.0+dfsg3-1~deb12u3
packages=(rustc-web cargo-web libstd-rust-web-1.85 libstd-rust-web-dev)
msrv=$(sed -n 's/^rust-version = "\(.*\)"$/\1/p' Cargo.toml)

not_run() {
  if [[ ${CI:-} == true ]]; then
    echo "msrv: CI=true and $1: the promised toolchain was not tested" >&2
    exit 1
  fi
  echo "msrv: NOT RUN: $1"
  exit 0
}
source /etc/os-release
[[ ${ID:-}:${VERSION_ID:-} == debian:12 ]] || not_run "not Debian 12 (${PRETTY_NAME:-unknown}), which packages rustc-web $deb_version"
[[ $(id -u) -eq 0 ]] || not_run "needs root (apt, and the unit tests that attach loop devices)"
[[ ${deb_version%%+*} == "$msrv"* ]] || {
  echo "msrv: Cargo.toml says rust-version $msrv but this script pins rustc-web $deb_version" >&2
  exit 1
}

installed=$(dpkg-query -W -f='${Version}' rustc-web 2>/dev/null || true)
if [[ $installed != "$deb_version" ]]; then
  echo "msrv: installing ${packages[*]} at $deb_version" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --allow-downgrades \
    "${packages[@]/%/=$deb_version}" >/dev/null
fi
/usr/bin/rustc --version | grep -q "^rustc $msrv" || {
  echo "msrv: /usr/bin/rustc is $(/usr/bin/rustc --version), not $msrv" >&2
  exit 1
}

echo "msrv: $(/usr/bin/cargo --version), $(/usr/bin/rustc --version)"
# As root every test runs, those that mount included.
RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc CARGO_TARGET_DIR=target/msrv \
  /usr/bin/cargo test --quiet --locked --workspace --lib --bins --examples -- --include-ignored
