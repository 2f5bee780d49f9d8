#!/usr/bin/env bash
# Installs the Debian package on this machine and checks it as an operator
# would meet it, then purges it and checks nothing is left:
#
#   scripts/check-package.sh DEB [RELEASE_BINARY]
#
# - with RELEASE_BINARY, the packaged binary must be byte-identical to it
#   (the reproducibility check: scripts/package.sh builds offline from
#   vendored sources in a directory of its own);
# - dpkg -i; the installed `filevol --version` and `filevol doctor`;
#   `systemd-analyze verify` of both units, which must print nothing;
# - the controller and the node plugin started with the units' own command
#   lines and /etc/default/filevol, node first; Probe over each socket
#   through `filevol client identity`; a volume created through the
#   controller; their idle RSS;
# - `man filevol-serve` renders, the bash completion loads;
# - purge with a volume in the default pool keeps the pool (users' data),
#   and removes everything else; purge of a pool holding no volume leaves
#   nothing at all.
#
# Needs root (dpkg). The default pool /var/lib/filevol must be absent or
# empty: the check owns it while it runs and leaves it as it found it.
set -euo pipefail
cd "$(dirname "$0")/.."

deb=${1:?usage: check-package.sh DEB [RELEASE_BINARY]}
release=${2:-}
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
  rmdir /run/filevol 2>/dev/null || true
}
cleanup() {
  set +e
  stop_services
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
MANWIDTH=80 MANPAGER=cat man filevol-serve 2>&1 | grep -q 'FILEVOL_POOL' || fail "man filevol-serve does not render"
bash -c 'source /usr/share/bash-completion/completions/filevol && complete -p filevol' >/dev/null ||
  fail "the bash completion does not load"

echo "== the units' command lines, node first"
start_unit filevol-node.service
probe unix:///run/filevol/node/csi.sock
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
[[ -e $pool ]] && left+=("$pool: $(ls -A "$pool" | tr '\n' ' ')")
[[ -e /run/filevol ]] && left+=(/run/filevol)
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
