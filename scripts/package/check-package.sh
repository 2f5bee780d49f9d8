#!/usr/bin/env bash
# Installs the Debian package on this machine and checks it as an operator
# would meet it, then purges it and checks nothing is left:
#
#   scripts/package/check-package.sh DEB [RELEASE_BINARY]
#
# - with RELEASE_BINARY, the packaged binary must be byte-identical to it
#   (the reproducibility check: scripts/package/package.sh builds offline from
#   vendored sources in a directory of its own);
# - dpkg -i; the installed `filevol --version` and `filevol doctor`;
#   `systemd-analyze verify` of both units, which must print nothing;
# - the controller and the node plugin started with the units' own command
#   lines and /etc/default/filevol (with a node id set there, which the
#   node plugin must report), node first; Probe over each socket through
#   `filevol client identity`; their idle RSS. Not under systemd (this
#   machine runs none as PID 1), so the units' sandboxing is checked by
#   `systemd-analyze verify` only;
# - `man filevol-serve` renders, the bash completion loads;
# - purge of a pool holding no volume leaves nothing at all; purge keeps
#   the pool (users' data) when it holds a volume made through the
#   packaged controller, or while a filevol process uses it, and removes
#   everything else.
#
# Needs root (dpkg). The default pool /var/lib/filevol must be absent or
# empty: the check owns it while it runs and leaves it as it found it.
set -euo pipefail
cd "$(dirname "$0")/../.."

deb=${1:?usage: check-package.sh DEB [RELEASE_BINARY]}
release=${2:-}
if [[ ${CI:-} == true && ! -x $release ]]; then
  echo "check-package: CI=true needs the release binary to compare with (got '${release}')" >&2
  exit 1
fi
pool=/var/lib/filevol
if [[ $(id -u) -ne 0 ]]; then
  echo "check-package: needs root (dpkg -i)" >&2
  exit 1
fi
if dpkg -s filevol >/dev/null 2>&1; then
  echo "check-package: filevol is installed already; purge it first" >&2
  exit 1
fi
pool_existed=false
if [[ -e $pool ]]; then
  if [[ -n $(ls -A "$pool") ]]; then
    echo "check-package: $pool holds files; the check needs it empty or absent" >&2
    exit 1
  fi
  pool_existed=true
  rmdir "$pool"
fi

pids=()
stop_services() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
  # What systemd does with RuntimeDirectory= when a unit stops.
  rm -rf /run/filevol/node /run/filevol/controller
}
cleanup() {
  set +e
  stop_services
  rmdir /run/filevol 2>/dev/null
  dpkg -s filevol >/dev/null 2>&1 && dpkg --purge filevol >/dev/null 2>&1
  rm -rf "$pool"
  $pool_existed && mkdir -p "$pool"
}
trap cleanup EXIT
fail() {
  echo "check-package: FAIL: $*" >&2
  exit 1
}

if [[ -n $release ]]; then
  extracted=$(mktemp -d)
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$extracted" ./usr/bin/filevol
  if ! cmp "$extracted/usr/bin/filevol" "$release"; then
    rm -rf "$extracted"
    fail "the packaged binary differs from the release build $release: the build is not reproducible"
  fi
  rm -rf "$extracted"
  echo "reproducible: the packaged binary and $release are identical ($(sha256sum "$release" | cut -c1-16)…)"
fi

install_package() {
  dpkg -i "$deb" >/dev/null
  [[ $(command -v filevol) == /usr/bin/filevol ]] || fail "filevol is not /usr/bin/filevol after dpkg -i"
}

# Starts a unit's ExecStart as systemd would: its Environment= first, then
# /etc/default/filevol, its RuntimeDirectory= made; $VAR and ${VAR} expand.
start_unit() {
  local unit=/lib/systemd/system/$1
  mkdir -p "/run/$(sed -n 's/^RuntimeDirectory=//p' "$unit")"
  (
    set -a
    while IFS= read -r line; do eval "${line#Environment=}"; done < <(grep '^Environment=' "$unit")
    # shellcheck source=/dev/null # the package installs it, shellcheck cannot follow it
    source /etc/default/filevol
    set +a
    eval "exec $(sed -n 's/^ExecStart=//p' "$unit")"
  ) 2>>"$work/$1.log" &
  pids+=($!)
}

# Waits for a Probe through the installed client, for up to 10 s.
probe() {
  local endpoint=$1 i
  for ((i = 0; i < 200; i++)); do
    filevol client --endpoint "$endpoint" identity >"$work/identity.out" 2>&1 && break
    sleep 0.05
  done
  grep -A2 '^Probe:' "$work/identity.out" | grep -q 'value: true' ||
    fail "no ready Probe on $endpoint: $(cat "$work/identity.out")"
}

work=$(mktemp -d /tmp/filevol-package.XXXXXX)
trap 'cleanup; rm -rf "$work"' EXIT

echo "== install"
install_package
filevol --version | grep -qx "filevol $(dpkg-deb -f "$deb" Version | cut -d- -f1)" ||
  fail "filevol --version: $(filevol --version)"
echo "installed: $(filevol --version), $(dpkg-query -W -f '${Installed-Size}' filevol) KiB"
filevol doctor >"$work/doctor.out" || fail "filevol doctor: $(cat "$work/doctor.out")"
grep -q "pool: $pool is writable" "$work/doctor.out" || fail "doctor did not find the default pool: $(cat "$work/doctor.out")"
verify=$(systemd-analyze verify /lib/systemd/system/filevol-node.service /lib/systemd/system/filevol-controller.service 2>&1) ||
  fail "systemd-analyze verify: $verify"
[[ -z $verify ]] || fail "systemd-analyze verify is not clean: $verify"
MANWIDTH=80 MANPAGER=cat man filevol-serve >"$work/man.out" 2>&1 || fail "man filevol-serve: $(cat "$work/man.out")"
grep -q 'FILEVOL_POOL' "$work/man.out" || fail "man filevol-serve does not render: $(head -n 5 "$work/man.out")"
bash -c 'source /usr/share/bash-completion/completions/filevol && complete -p filevol' >/dev/null ||
  fail "the bash completion does not load"

echo "== the units' command lines, node first"
# As an operator would: a setting in /etc/default/filevol that no default
# gives, so the check fails if the units do not read the file.
echo "FILEVOL_NODE_ID=package-check-node" >>/etc/default/filevol
start_unit filevol-node.service
probe unix:///run/filevol/node/csi.sock
filevol client --endpoint unix:///run/filevol/node/csi.sock node-info >"$work/node-info.out" 2>&1 || true
grep -q 'package-check-node' "$work/node-info.out" ||
  fail "the node plugin did not take FILEVOL_NODE_ID from /etc/default/filevol: $(cat "$work/node-info.out")"
start_unit filevol-controller.service
probe unix:///run/filevol/controller/csi.sock
for pid in "${pids[@]}"; do
  echo "idle RSS of $(tr '\0' ' ' </proc/"$pid"/cmdline | cut -d' ' -f2-4): $(awk '/^VmRSS:/ {print $2, $3}' /proc/"$pid"/status)"
done
stop_services

echo "== purge with no volume in the pool"
[[ -d $pool/volumes ]] || fail "the services did not use the default pool $pool"
listed=$(dpkg -L filevol)
dpkg --purge filevol >/dev/null 2>"$work/purge.err" || fail "dpkg --purge: $(cat "$work/purge.err")"
left=()
while IFS= read -r path; do
  # Directories other packages share (/usr/bin, /etc/default) stay.
  [[ -e $path && ! ( -d $path && $path != "$pool" && $path != /usr/share/doc/filevol* ) ]] && left+=("$path")
done <<<"$listed"
[[ -e /etc/default/filevol ]] && left+=(/etc/default/filevol)
[[ -e $pool ]] && left+=("$pool: $(find "$pool" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort | tr '\n' ' ')")
((${#left[@]} == 0)) || fail "left after purge: ${left[*]}"
echo "purged: nothing left"

echo "== purge with a volume in the pool"
install_package
start_unit filevol-controller.service
probe unix:///run/filevol/controller/csi.sock
filevol client --endpoint unix:///run/filevol/controller/csi.sock create-volume package-check --size 16Mi >/dev/null ||
  fail "CreateVolume through the packaged controller"
stop_services
volumes=$(ls "$pool/volumes")
dpkg --purge filevol >/dev/null 2>"$work/purge.err" || fail "dpkg --purge: $(cat "$work/purge.err")"
grep -q "kept $pool: it holds volumes" "$work/purge.err" || fail "purge did not say it kept the pool: $(cat "$work/purge.err")"
[[ $(ls "$pool/volumes") == "$volumes" ]] || fail "purge touched the volumes in $pool"
[[ ! -e /usr/bin/filevol && ! -e /etc/default/filevol ]] || fail "purge left the package's files"
echo "purged: the pool with its volume was kept, the package's files removed"
rm -rf "$pool"

echo "== purge while a filevol process uses the pool"
install_package
start_unit filevol-controller.service
probe unix:///run/filevol/controller/csi.sock
dpkg --purge filevol >/dev/null 2>"$work/purge.err" || fail "dpkg --purge: $(cat "$work/purge.err")"
grep -q "kept $pool: a filevol process uses it" "$work/purge.err" ||
  fail "purge did not keep a pool in use: $(cat "$work/purge.err")"
[[ -d $pool/volumes ]] || fail "purge removed parts of a pool in use"
stop_services
echo "purged: the pool in use was kept"
