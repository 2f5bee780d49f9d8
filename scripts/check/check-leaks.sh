#!/usr/bin/env bash
# Fails when a test left a mount or a loop device behind: anything mounted
# from, or backed by a file in, a temporary directory. Silent when clean, so
# the test runner's summary stays the last line of the run.
set -uo pipefail

# One path a line: mountinfo escapes the blanks in its paths, a loop
# device's backing_file holds one path.
mapfile -t mounts < <(awk '$5 ~ "^/tmp/" {print $5}' /proc/self/mountinfo)
mapfile -t loops < <(for f in /sys/block/loop*/loop/backing_file; do
  [[ -r $f ]] && grep -E '^/tmp/' "$f"
done 2>/dev/null)

if ((${#mounts[@]} > 0 || ${#loops[@]} > 0)); then
  echo "check-leaks: the tests left these behind:" >&2
  ((${#mounts[@]} == 0)) || printf '  mount: %s\n' "${mounts[@]}" >&2
  ((${#loops[@]} == 0)) || printf '  loop backing file: %s\n' "${loops[@]}" >&2
  exit 1
fi
