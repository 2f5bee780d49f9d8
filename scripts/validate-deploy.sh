#!/usr/bin/env bash
# Validates deploy/ with real tools: renders the kustomization and each
# overlay with `kubectl kustomize`, checks every object against the
# Kubernetes API schemas of the three newest minor versions
# kubernetes-validate knows (strict: unknown fields are errors), and checks
# the cross-references a typo would break (scripts/check_deploy.py), and the
# Nomad jobs (scripts/check_nomad.py).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${FILEVOL_DEPLOY_VENV:-$PWD/target/deploy-venv}
if ! "$venv/bin/python" -c 'import kubernetes_validate, yaml, hcl2' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/deploy-requirements.txt
fi
if ! command -v kubectl >/dev/null; then
  echo "validate-deploy: kubectl is needed to render the kustomizations (kubectl kustomize)" >&2
  exit 1
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
rendered=()
for dir in deploy/kubernetes deploy/kubernetes/overlays/*; do
  name=$(basename "$dir")
  kubectl kustomize "$dir" >"$out/$name.yaml"
  rendered+=("$out/$name.yaml")
done

status=0
for version in 1.35.0 1.36.0 1.37.0; do
  # --no-warn: the snapshot classes are CRDs the schemas do not cover;
  # check_deploy.py checks those.
  if ! "$venv/bin/kubernetes-validate" --strict --quiet --no-warn -k "$version" \
      "${rendered[@]}" deploy/kubernetes/examples/*.yaml; then
    echo "validate-deploy: schema errors for Kubernetes $version" >&2
    status=1
  fi
done
"$venv/bin/python" scripts/check_deploy.py "${rendered[@]}" deploy/kubernetes/examples/*.yaml || status=1

"$venv/bin/python" scripts/check_nomad.py deploy/nomad/*.nomad.hcl || status=1

# The checker must catch the typos it exists for: each of these broken
# copies of the default rendering has to fail.
base="$out/kubernetes.yaml"
while IFS='|' read -r what from to; do
  sed "0,\|$from|s||$to|" "$base" >"$out/broken.yaml"
  if "$venv/bin/python" scripts/check_deploy.py "$out/broken.yaml" 2>/dev/null; then
    echo "validate-deploy: check_deploy.py missed a broken $what" >&2
    status=1
  fi
done <<'CASES'
sidecar socket path|--csi-address=/csi/csi.sock|--csi-address=/sock/csi.sock
mount propagation|mountPropagation: Bidirectional|mountPropagation: HostToContainer
service account|serviceAccountName: filevol-controller|serviceAccountName: filevol-controler
volume name|name: socket-dir|name: socket-dirr
driver name|provisioner: filevol.csi.rs|provisioner: filevol.csi.io
registration path|plugins/filevol.csi.rs/csi.sock|plugins/filevol/csi.sock
CASES
[[ $status -eq 0 ]] && echo "validate-deploy: ${#rendered[@]} renderings and the examples are valid for Kubernetes 1.35-1.37; the Nomad jobs check out"
exit "$status"
