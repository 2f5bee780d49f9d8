#!/usr/bin/env bash
# Which way imports run (CONTRIBUTING.md): the crate graph enforces it, and
# this checks the two promises a new dependency line could quietly break.
#
# - filevol-core builds without gRPC or protobuf, tests included, so
#   `cargo test -p filevol-core` never waits for gRPC core's C++ build.
# - Nothing shipped links the test kit: the driver's normal and build
#   dependencies do not reach filevol-kit.
set -euo pipefail
cd "$(dirname "$0")/../.."

status=0
core=$(cargo tree --locked -p filevol-core -e normal,build,dev --prefix none --format '{p}')
if grep -E '^(grpcio|grpcio-sys|protobuf)[ @]' <<<"$core" | sort -u | grep .; then
  echo "layers: filevol-core (or its dev-dependencies) pulls in the crates above; the core must build without gRPC" >&2
  status=1
fi
shipped=$(cargo tree --locked -p filevol -e normal,build --prefix none --format '{p}')
if grep -E '^filevol-kit[ @]' <<<"$shipped" | sort -u | grep .; then
  echo "layers: the filevol binary links the test kit" >&2
  status=1
fi
((status == 0)) && echo "layers: filevol-core has no gRPC; nothing shipped links filevol-kit"
exit "$status"
