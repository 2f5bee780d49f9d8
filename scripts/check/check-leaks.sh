#!/usr/bin/env bash
# Fails when a test left a mount or a loop device behind: anything mounted
# from, or backed by a file in, a temporary directory. Silent when clean, so
# the test runner's summary stays the last line of the run.
set -uo pipefail

mounts=$(awk '$5 ~ "^/tmp/" {print $5}' /proc/self/mountinfo)
loops=$(for f in /sys/block/loop*/loop/backing_file; do
  [[ -r $f ]] && grep -E '^/tmp/' "$f"
done 2>/dev/null)

if [[ -n $mounts || -n $loops ]]; then
  echo "check-leaks: the tests left these behind:" >&2
  [[ -n $mounts ]] && printf '  mount: %s\n' $mounts >&2
  [[ -n $loops ]] && printf '  loop backing file: %s\n' $loops >&2
  exit 1
fi
