#!/usr/bin/env bash
# Which way imports run (CONTRIBUTING.md): the crate graph enforces it, and
# this checks what a new dependency or import line could quietly break:
#
# - filevol-core builds without gRPC or protobuf, tests included, so
#   `cargo test -p filevol-core` never waits for gRPC core's C++ build.
# - Nothing shipped links the test kit: the driver's normal and build
#   dependencies do not reach filevol-kit.
# - Inside filevol-core, each module imports only from the layers below it
#   (the table below; comments are not imports).
# - No crate has an import circle between its modules
#   (scripts/check/module_cycles.py).
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
# module: what its code may name as crate::<module>
declare -A allowed=(
  [sys]="sys faults"
  [units]=""
  [faults]=""
  [error_chain]=""
  [volume]="volume units"
  [health]="health sys units"
  [changed_blocks]="changed_blocks sys"
  [pool]="pool volume changed_blocks health sys units faults error_chain"
  [node]="node pool volume health sys units faults error_chain"
)
core=crates/core/src
if grep -rn 'crate::{' "$core"; then
  echo "layers: write one \`use crate::<module>...\` per module in filevol-core, so this check can read it" >&2
  status=1
fi
for module in "${!allowed[@]}"; do
  files=("$core/$module.rs")
  [[ -d $core/$module ]] && files=("$core/$module")
  while IFS= read -r hit; do
    used=${hit##*crate::}
    if [[ " ${allowed[$module]} " != *" $used "* ]]; then
      echo "layers: filevol-core's $module imports crate::$used" >&2
      status=1
    fi
  done < <(grep -rhE '^[^/]*\bcrate::[a-z_]+' "${files[@]}" | grep -v '^\s*//' |
    grep -oE '\bcrate::[a-z_]+' | sort -u)
done
python3 scripts/check/module_cycles.py crates/core/src crates/kit/src src || status=1
((status == 0)) && echo "layers: filevol-core has no gRPC, its modules import downwards only, no crate has an import circle; nothing shipped links filevol-kit"
exit "$status"
