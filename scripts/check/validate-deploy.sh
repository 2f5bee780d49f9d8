#!/usr/bin/env bash
# Validates deploy/ with real tools: renders the kustomization and each
# overlay with `kubectl kustomize`, checks every object against the
# Kubernetes API schemas of the three newest minor versions
# kubernetes-validate knows (strict: unknown fields are errors), and checks
# the cross-references a typo would break and the sidecar behaviour a
# layout depends on (scripts/check/check_deploy.py, which asks the filevol binary
# what it advertises with each workload's flags), and the Nomad jobs
# (scripts/check/check_nomad.py). Then it breaks the default rendering once per
# class of mistake and requires the checker to catch every one.
#
# kubectl: the one on PATH, else the v1.36 kubectl of ../shared/tools/k8s
# (kustomize v5 built in). The binary: FILEVOL_BIN, else a debug build.
set -euo pipefail
cd "$(dirname "$0")/../.."

kubectl=$(command -v kubectl || true)
tools_kubectl=../shared/tools/k8s/bin/kubectl.xz
if [[ -z $kubectl && -f $tools_kubectl ]]; then
  mkdir -p target/tools
  [[ -x target/tools/kubectl ]] || { xz -dc "$tools_kubectl" >target/tools/kubectl.tmp && chmod +x target/tools/kubectl.tmp && mv target/tools/kubectl.tmp target/tools/kubectl; }
  kubectl=$PWD/target/tools/kubectl
fi
if [[ -z ${FILEVOL_BIN:-} ]]; then
  cargo build --locked --quiet --bin filevol
  FILEVOL_BIN=${CARGO_TARGET_DIR:-$PWD/target}/debug/filevol
fi

venv=${FILEVOL_DEPLOY_VENV:-$PWD/target/deploy-venv}
if ! "$venv/bin/python" -c 'import kubernetes_validate, yaml, hcl2' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/check/requirements.txt
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
rendered=()
if [[ -n $kubectl ]]; then
  for dir in deploy/kubernetes deploy/kubernetes/overlays/*; do
    name=$(basename "$dir")
    "$kubectl" kustomize "$dir" >"$out/$name.yaml"
    rendered+=("$out/$name.yaml")
  done
else
  if [[ ${CI:-} == true ]]; then
    echo "validate-deploy: no kubectl and no ../shared/tools/k8s: the overlays cannot be rendered (CI=true: failing)" >&2
    exit 1
  fi
  # No registry this project installs from has a kubectl with kustomize v5.
  # Without it the overlays (patches) cannot be rendered; base/ uses only
  # `namespace` and `resources`, so it is assembled here and checked all
  # the same.
  echo "validate-deploy: kubectl not found: checking deploy/kubernetes/base only, overlays not rendered" >&2
  "$venv/bin/python" - deploy/kubernetes/base "$out/kubernetes.yaml" <<'PY'
import os, sys, yaml
base, dest = sys.argv[1], sys.argv[2]
k = yaml.safe_load(open(os.path.join(base, "kustomization.yaml")))
docs = []
for r in k["resources"]:
    for d in yaml.safe_load_all(open(os.path.join(base, r))):
        if d and d["kind"] not in ("Namespace", "CSIDriver", "StorageClass", "ClusterRole",
                                   "ClusterRoleBinding", "VolumeSnapshotClass", "VolumeGroupSnapshotClass"):
            d["metadata"]["namespace"] = k["namespace"]
        if d:
            docs.append(d)
yaml.safe_dump_all(docs, open(dest, "w"))
PY
  rendered+=("$out/kubernetes.yaml")
fi

status=0
for version in 1.35.0 1.36.0 1.37.0; do
  # --no-warn: the snapshot classes and the SnapshotMetadataService are
  # CRDs the schemas do not cover; check_deploy.py checks those.
  if ! "$venv/bin/kubernetes-validate" --strict --quiet --no-warn -k "$version" \
      "${rendered[@]}" deploy/kubernetes/examples/*.yaml; then
    echo "validate-deploy: schema errors for Kubernetes $version" >&2
    status=1
  fi
done
# --allow-unadvertised-snapshot-metadata: whether filevol advertises
# SNAPSHOT_METADATA_SERVICE (without which the csi-snapshot-metadata sidecar
# of overlays/snapshot-metadata exits at start) is not the manifests' alone:
# the binary may predate the service, and a controller advertises it only
# where its pool can reflink, while the pool the checker serves is a
# temporary directory on this machine, not the node's. So the answer is
# printed as a warning; everything else about that overlay is checked.
sm_capability=--allow-unadvertised-snapshot-metadata
"$venv/bin/python" scripts/check/check_deploy.py --filevol "$FILEVOL_BIN" $sm_capability "${rendered[@]}" || status=1
"$venv/bin/python" scripts/check/check_deploy.py deploy/kubernetes/examples/*.yaml || status=1

"$venv/bin/python" scripts/check/check_nomad.py deploy/nomad/*.nomad.hcl || status=1

# The checker must catch the classes of mistake it exists for, each made on
# purpose on a copy of the default rendering (and of the snapshot-metadata
# overlay's, for the mistakes only it can hold)...
selftest=("$out/kubernetes.yaml")
[[ -n $kubectl ]] && selftest+=("$out/snapshot-metadata.yaml")
"$venv/bin/python" scripts/check/check_deploy.py --self-test --filevol "$FILEVOL_BIN" $sm_capability "${selftest[@]}" || status=1
# ...and the typos: each of these broken copies has to fail.
typos() {
  local base=$1 what from to
  while IFS='|' read -r what from to; do
    sed "0,\|$from|s||$to|" "$base" >"$out/broken.yaml"
    if "$venv/bin/python" scripts/check/check_deploy.py "$out/broken.yaml" 2>/dev/null; then
      echo "validate-deploy: check_deploy.py missed a broken $what ($(basename "$base"))" >&2
      status=1
    fi
  done
}
if [[ -n $kubectl ]]; then
  typos "$out/snapshot-metadata.yaml" <<'CASES'
TLS certificate path|--tls-cert=/etc/csi-snapshot-metadata/tls/tls.crt|--tls-cert=/etc/csi-snapshot-metadata/tls.crt
TLS volume name|name: snapshot-metadata-tls|name: snapshot-metadata-tsl
Service target port|targetPort: snapshot-meta|targetPort: 50052
SnapshotMetadataService address|address: filevol-snapshot-metadata.filevol:6443|address: filevol-snapshot-metadata:6443
SnapshotMetadataService audience|audience: filevol-snapshot-metadata|audience: ""
snapshot-metadata RBAC resource|- subjectaccessreviews|- subjectaccessreview
CASES
fi
typos "$out/kubernetes.yaml" <<'CASES'
sidecar socket path|--csi-address=/csi/csi.sock|--csi-address=/sock/csi.sock
mount propagation|mountPropagation: Bidirectional|mountPropagation: HostToContainer
service account|serviceAccountName: filevol-controller|serviceAccountName: filevol-controler
volume name|name: socket-dir|name: socket-dirr
driver name|provisioner: filevol.csi.rs|provisioner: filevol.csi.io
registration path|plugins/filevol.csi.rs/csi.sock|plugins/filevol/csi.sock
CASES
[[ $status -eq 0 ]] && echo "validate-deploy: ${#rendered[@]} rendering(s) and the examples are valid for Kubernetes 1.35-1.37; the Nomad jobs check out"
exit "$status"
