#!/usr/bin/env bash
# Builds filevol's Debian package the way a distribution builds it: from the
# committed sources with every crate vendored, offline, in a directory of its
# own.
#
#   scripts/package/package.sh            -> target/package/filevol_<version>-1_<arch>.deb
#
# 1. The sources of HEAD (git archive: what a release tarball holds) go to
#    target/package/filevol-<version>/, and `cargo vendor` puts every crate
#    of Cargo.lock beside them (from ~/.cargo's cache or crates.io).
# 2. The build runs with no network (a network namespace of its own:
#    unshare -n) and an empty CARGO_HOME, `--offline --frozen`: what is not
#    vendored cannot be found. The settings of scripts/package/release-env.sh
#    make the binary byte-identical to scripts/package/build-release.sh's for the
#    same commit; CI compares the two (.ci/run).
# 3. The manual pages and completions come from the clap definitions
#    (examples/generate-docs.rs), the dependency report and the licence
#    files from the vendored crates (scripts/package/licences.py).
# 4. dpkg-deb packs it, with file times set to the commit's.
#
# The package: /usr/bin/filevol; filevol(1) and a page per subcommand;
# completions for bash, zsh and fish; systemd units for the node plugin and
# the controller (deploy/systemd/), their settings in /etc/default/filevol;
# the default pool /var/lib/filevol; /usr/share/doc/filevol with the
# copyright file, the dependency report and the licence of everything
# linked in. Neither unit is enabled: a host runs the node plugin, the
# controller or both, as the operator decides.
#
# The toolchain is the one on PATH (the same as the ordinary release build,
# which the binary must match). Needs: git, cargo, dpkg-deb, dpkg-shlibdeps
# (dpkg-dev), unshare (util-linux; as root, or with user namespaces).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
# File modes in the package must not depend on the builder's umask.
umask 022
source scripts/package/release-env.sh

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
revision=1
arch=$(dpkg --print-architecture)
out=$repo/target/package
src=$out/filevol-$version
deb=$out/filevol_${version}-${revision}_${arch}.deb
# A distribution puts its own name here.
maintainer=${DEB_MAINTAINER:-filevol developers <packaging@filevol.invalid>}

if [[ -n $(git status --porcelain --untracked-files=no) ]]; then
  echo "package: the work tree has uncommitted changes; the package holds HEAD ($(git rev-parse --short HEAD)) only" >&2
fi
epoch=$(git log -1 --format=%ct)

echo "== sources of $(git rev-parse --short HEAD), vendored" >&2
rm -rf "$out"
mkdir -p "$src"
git archive --format=tar HEAD | tar -x -C "$src"
(cd "$src" && cargo vendor --locked --versioned-dirs --quiet vendor >/dev/null)
mkdir -p "$src/.cargo"
cat >"$src/.cargo/config.toml" <<'EOF'
# Every crate comes from vendor/ (scripts/package/package.sh).
[source.crates-io]
replace-with = "vendored-sources"

[source.vendored-sources]
directory = "vendor"
EOF

echo "== offline build (no network, empty CARGO_HOME)" >&2
# The toolchain rustup (or the distribution) resolves for this checkout,
# called directly: a new CARGO_HOME must not change which one runs.
cargo_bin=$(rustup which cargo 2>/dev/null || command -v cargo)
rustc_bin=$(rustup which rustc 2>/dev/null || command -v rustc)
netns=(unshare --net)
[[ $(id -u) -eq 0 ]] || netns+=(--map-root-user)
mkdir -p "$out/cargo-home"
(
  cd "$src"
  export CARGO_HOME=$out/cargo-home RUSTC=$rustc_bin SOURCE_DATE_EPOCH=$epoch
  unset CARGO_TARGET_DIR
  release_env "$src" "$src/target" "$src/vendor"
  "${netns[@]}" "$cargo_bin" build --release --offline --frozen --bin filevol --quiet \
    --target-dir "$src/target"
  # A separate invocation: the example's dev-dependencies must not change
  # the features the binary was built with.
  "${netns[@]}" "$cargo_bin" run --release --offline --frozen --quiet \
    --target-dir "$src/target" --example generate-docs -- "$out/docs"
)
bin=$src/target/release/filevol

echo "== package tree" >&2
# Everything from here on comes from the archived sources too.
cd "$src"
root=$out/root
doc=$root/usr/share/doc/filevol
install -D -m 0755 "$bin" "$root/usr/bin/filevol"
install -d "$root/usr/share/man/man1"
for page in "$out"/docs/man/*.1; do
  name=$(basename "$page")
  gzip -9n <"$page" >"$root/usr/share/man/man1/$name.gz"
done
install -D -m 0644 "$out/docs/completions/filevol.bash" "$root/usr/share/bash-completion/completions/filevol"
install -D -m 0644 "$out/docs/completions/_filevol" "$root/usr/share/zsh/vendor-completions/_filevol"
install -D -m 0644 "$out/docs/completions/filevol.fish" "$root/usr/share/fish/vendor_completions.d/filevol.fish"
install -D -m 0644 -t "$root/lib/systemd/system" deploy/systemd/filevol-node.service deploy/systemd/filevol-controller.service
install -D -m 0644 deploy/systemd/filevol.default "$root/etc/default/filevol"
# The default pool. dpkg removes it with the package only when it is empty;
# postrm (purge) removes the skeleton filevol made in it unless it holds
# volumes or snapshots.
install -d -m 0750 "$root/var/lib/filevol"
install -D -m 0644 README.md "$doc/README.md"
gzip -9n <CHANGELOG.md >"$doc/changelog.gz"
"$cargo_bin" metadata --offline --frozen --format-version 1 \
  --filter-platform "$("$rustc_bin" -vV | sed -n 's/^host: //p')" |
  python3 scripts/package/licences.py --report "$doc/dependencies.txt" --collect "$doc/licenses" >&2
cat >"$doc/copyright" <<'EOF'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: filevol

Files: *
Copyright: the filevol authors
License: Apache-2.0
 On Debian systems, the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
Comment: /usr/bin/filevol is statically linked with the Rust crates and the
 C and C++ libraries (gRPC core and what it bundles, zlib) that
 /usr/share/doc/filevol/dependencies.txt lists with their versions and
 licences; their licence files are in /usr/share/doc/filevol/licenses/.
EOF

install -d "$root/DEBIAN"
echo /etc/default/filevol >"$root/DEBIAN/conffiles"
install -m 0755 deploy/debian/postinst deploy/debian/prerm deploy/debian/postrm "$root/DEBIAN/"
# Library dependencies as dpkg-shlibdeps finds them (libc6, libgcc-s1,
# libstdc++6: gRPC core is C++); it wants a debian/control to read.
shlibs=$(mkdir -p "$out/shlibs/debian" && cd "$out/shlibs" &&
  printf 'Source: filevol\n\nPackage: filevol\nArchitecture: any\n' >debian/control &&
  dpkg-shlibdeps -O "$root/usr/bin/filevol" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
installed_kib=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<EOF
Package: filevol
Version: $version-$revision
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_kib
Depends: $shlibs, e2fsprogs, mount, util-linux
Recommends: xfsprogs
Suggests: btrfs-progs
Section: admin
Priority: optional
Description: CSI driver that turns a directory into sized Kubernetes volumes
 filevol serves the Container Storage Interface on a UNIX socket. Each volume
 is a sparse image file in a pool directory (a local disk, or NFS or CephFS
 shared by every node) behind a loop device, formatted ext4, xfs or btrfs or
 handed over as a raw block device; snapshots and clones are reflink copies.
 .
 This package holds the driver, its manual pages and shell completions, and
 systemd units for the node plugin and the controller (not enabled).
EOF
(cd "$root" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z | xargs -0 md5sum >DEBIAN/md5sums)
find "$root" -exec touch -h -d "@$epoch" {} +
SOURCE_DATE_EPOCH=$epoch dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null

echo "package: $deb ($(stat -c %s "$deb") bytes, installed $installed_kib KiB)" >&2
echo "$deb"
