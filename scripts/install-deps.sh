#!/usr/bin/env bash
# Installs what building and testing filevol needs on a fresh Debian/Ubuntu
# machine. Idempotent: packages already present are left alone.
#
# Build: cmake (grpcio-sys builds gRPC core with it), a C/C++ compiler.
# Tests: the filesystem tools the node service runs (mkfs, growfs, probing;
# blkid is util-linux), mount/umount/losetup for the tests' own set-up and
# clean-up, and bindfs: a FUSE view of a pool that stands in for a network
# share (it cannot report holes, as NFS before 4.2 cannot).
# Deploy validation: python3-venv for its pinned tools
# (scripts/deploy-requirements.txt), and xz to unpack the kubectl of
# ../shared/tools/k8s when none is on PATH (its kustomize renders the
# overlays). scripts/e2e-k8s.sh installs what the cluster run needs itself.
set -euo pipefail

packages=(cmake build-essential pkg-config e2fsprogs xfsprogs btrfs-progs util-linux mount python3-venv bindfs xz-utils)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  sudo_cmd=()
  [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  echo "install-deps: installing ${missing[*]}" >&2
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The loop driver must be loaded for the node tests; it is built in on most
# kernels, a module on some.
[[ -e /dev/loop-control ]] || modprobe loop 2>/dev/null || true
