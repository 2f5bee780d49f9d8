# shellcheck shell=bash
# Sourced, not run. The environment that makes a release binary depend on
# the sources and the toolchain only, not on where or when it was built, so
# the binary of the package (built from vendored sources in its own
# directory, scripts/package/package.sh) and the ordinary release build of the same
# commit (scripts/package/build-release.sh) are byte-identical.
#
# release_env SOURCE_DIR TARGET_DIR [VENDOR_DIR]
#
# What would differ otherwise, and what maps it away:
# - Rust embeds source paths in panic locations: the crates' sources
#   (~/.cargo/registry/src/<index>/NAME-VERSION, or VENDOR_DIR/NAME-VERSION
#   when vendored with --versioned-dirs) and the generated code in OUT_DIR
#   under TARGET_DIR. --remap-path-prefix rewrites both to fixed names.
#   This crate's own sources are already relative (cargo runs rustc in the
#   package root).
# - gRPC core (C++, built by grpcio-sys through cmake and cc) embeds
#   __FILE__ in its logging and assertions: -ffile-prefix-map in
#   CFLAGS/CXXFLAGS, which cmake and cc pass to the compiler.
# - __DATE__ and __TIME__: GCC takes them from SOURCE_DATE_EPOCH, set to the
#   commit's time.
# Nothing else varies: strip = "symbols" drops debug info, the linker's
# build id hashes the contents, Debian's ar writes deterministic archives.
#
# rustc and GCC both apply the last matching map, so the broad ones (the
# source tree) come first and those inside it (target, vendor) after.

release_env() {
  local src=$1 target=$2 vendor=${3:-}
  if [[ -n ${RUSTFLAGS:-}${CARGO_ENCODED_RUSTFLAGS:-}${CFLAGS:-}${CXXFLAGS:-} ]]; then
    echo "release build: RUSTFLAGS, CFLAGS or CXXFLAGS is set; a release build sets its own (scripts/package/release-env.sh)" >&2
    return 1
  fi
  local maps=("$src=/usr/src/filevol" "$target=/usr/src/filevol/target")
  local registry
  for registry in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/; do
    [[ -d $registry ]] && maps+=("${registry%/}=/usr/src/cargo-crates")
  done
  [[ -n $vendor ]] && maps+=("$vendor=/usr/src/cargo-crates")

  local rustflags=() cflags=() map
  for map in "${maps[@]}"; do
    # CFLAGS is split on spaces by cc and cmake; no quoting survives that.
    if [[ $map == *[[:space:]]* ]]; then
      echo "release build: a build path contains a space: $map" >&2
      return 1
    fi
    rustflags+=("--remap-path-prefix=$map")
    cflags+=("-ffile-prefix-map=$map")
  done
  # \x1f-separated: cargo's unambiguous form of RUSTFLAGS.
  CARGO_ENCODED_RUSTFLAGS=$(IFS=$'\x1f'; echo "${rustflags[*]}")
  CFLAGS="${cflags[*]}"
  CXXFLAGS="${cflags[*]}"
  if [[ -z ${SOURCE_DATE_EPOCH:-} ]]; then
    SOURCE_DATE_EPOCH=$(git -C "$src" log -1 --format=%ct 2>/dev/null) || {
      echo "release build: not a git checkout: set SOURCE_DATE_EPOCH" >&2
      return 1
    }
  fi
  export CARGO_ENCODED_RUSTFLAGS CFLAGS CXXFLAGS SOURCE_DATE_EPOCH
}
