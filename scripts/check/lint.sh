#!/usr/bin/env bash
# The gate for the scripts, run by CI (.ci/run) right after clippy:
# - shellcheck (Debian's package, scripts/install-deps.sh installs it) over
#   every *.sh under scripts/ and .ci/run, following what they source;
# - ruff check, at the version pinned in scripts/check/requirements.txt,
#   over every *.py under scripts/, with the rules of ruff.toml.
# Both run to the end, so one run lists every finding; any finding fails.
#
# ruff lives in the virtual environment of scripts/check/validate-deploy.sh
# (target/deploy-venv, or FILEVOL_DEPLOY_VENV), installed from the same
# requirements file when the pinned ruff is not there yet.
set -euo pipefail
cd "$(dirname "$0")/../.."

command -v shellcheck >/dev/null || {
  echo "lint: no shellcheck on PATH (scripts/install-deps.sh installs it)" >&2
  exit 1
}
venv=${FILEVOL_DEPLOY_VENV:-$PWD/target/deploy-venv}
ruff_version=$(sed -n 's/^ruff==//p' scripts/check/requirements.txt)
if [[ $("$venv/bin/ruff" --version 2>/dev/null) != "ruff $ruff_version" ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/check/requirements.txt
fi

mapfile -t shell_files < <(find scripts -name '*.sh' -type f | sort)
shell_files+=(.ci/run)
mapfile -t python_files < <(find scripts -name '*.py' -type f | sort)

status=0
echo "== shellcheck $(shellcheck --version | sed -n 's/^version: //p'): ${#shell_files[@]} files"
# -x: the files a script sources are checked as part of it (their paths are
# relative to the repository root, where this runs).
shellcheck -x "${shell_files[@]}" || status=1
echo "== $("$venv/bin/ruff" --version): ${#python_files[@]} files"
"$venv/bin/ruff" check "${python_files[@]}" || status=1
if ((status == 0)); then
  echo "lint: clean"
fi
exit "$status"
