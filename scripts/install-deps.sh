#!/usr/bin/env bash
# Installs what building and testing filevol needs on a fresh Debian/Ubuntu
# machine. Idempotent: packages already present are left alone.
#
# Build: cmake (grpcio-sys builds gRPC core with it), a C/C++ compiler.
# Tests: the filesystem tools the node service runs (mkfs, growfs, probing;
# blkid is util-linux), mount/umount/losetup for the tests' own set-up and
# clean-up, and bindfs: a FUSE view of a pool that stands in for a network
# share (it cannot report holes, as NFS before 4.2 cannot).
# Rust: when no cargo is on PATH, the distribution's own toolchain
# (rustc-web/cargo-web on Debian 12, rustc/cargo elsewhere) if it is at
# least filevol's rust-version; rustup's toolchains are left alone.
# Deploy validation: python3-venv for its pinned tools
# (scripts/check/requirements.txt), and xz to unpack the kubectl of
# ../shared/tools/k8s when none is on PATH (its kustomize renders the
# overlays). scripts/check/e2e-k8s.sh installs what the cluster run needs itself.
# Alert rules (scripts/check/alerts.sh): promtool, from the prometheus
# package, runs their unit tests.
# Script lint (scripts/check/lint.sh): shellcheck; its ruff is pinned in
# scripts/check/requirements.txt and goes to the same venv.
set -euo pipefail

# Packaging (scripts/package/package.sh, scripts/package/check-package.sh): dpkg-dev for
# dpkg-shlibdeps, systemd for `systemd-analyze verify`, man-db for `man`.
packages=(cmake build-essential pkg-config e2fsprogs xfsprogs btrfs-progs util-linux mount python3-venv bindfs xz-utils
  dpkg-dev systemd man-db shellcheck prometheus)

sudo_cmd=()
[[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
updated=false
apt_install() {
  echo "install-deps: installing $*" >&2
  if ! $updated; then
    "${sudo_cmd[@]}" apt-get update -qq
    updated=true
  fi
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "$@"
}

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
((${#missing[@]} == 0)) || apt_install "${missing[@]}"

if ! command -v cargo >/dev/null; then
  msrv=$(sed -n 's/^rust-version = "\(.*\)"$/\1/p' "$(dirname "$0")/../Cargo.toml")
  source /etc/os-release
  # Debian 12's rustc is 1.63; its rustc-web packages carry a current
  # toolchain (built for Firefox and Chromium), in the main archive too.
  rust=(rustc cargo)
  [[ $ID:${VERSION_ID:-} == debian:12 ]] && rust=(rustc-web cargo-web)
  $updated || { "${sudo_cmd[@]}" apt-get update -qq; updated=true; }
  candidate=$(apt-cache policy "${rust[0]}" | sed -n 's/^ *Candidate: //p')
  # 1.85.0+dfsg3-1~deb12u3 -> 1.85.0
  upstream=${candidate#*:}
  upstream=${upstream%%[+~-]*}
  if [[ -z $candidate || $candidate == "(none)" ]] || ! dpkg --compare-versions "$upstream" ge "$msrv"; then
    echo "install-deps: no cargo on PATH, and ${PRETTY_NAME:-this distribution} packages no Rust $msrv or newer (${rust[0]}: ${candidate:-none})." >&2
    echo "  Install Rust $msrv or newer with rustup (https://rustup.rs), or on Ubuntu a versioned" >&2
    echo "  rustc-1.NN/cargo-1.NN pair at least that new (put /usr/lib/rust-1.NN/bin on PATH), then run this again." >&2
    exit 1
  fi
  apt_install "${rust[@]}"
fi

# The loop driver must be loaded for the node tests; it is built in on most
# kernels, a module on some.
[[ -e /dev/loop-control ]] || modprobe loop 2>/dev/null || true
