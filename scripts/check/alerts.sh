#!/usr/bin/env bash
# Checks the monitoring that ships in deploy/kubernetes/components/monitoring:
# - the PrometheusRule's rules pass `promtool check rules` and the unit tests
#   of scripts/check/alerts-test.yaml (`promtool test rules`);
# - every metric the rules and the dashboard (filevol-dashboard.json) query
#   is one filevol exports: a real filevol (`--mode all` on a scratch pool)
#   is started and its /metrics scraped, and each name in every expression
#   must be a family it lists (a histogram's _bucket/_sum/_count too).
#
# promtool comes from Debian's prometheus package (scripts/install-deps.sh);
# without it this fails under CI=true and says so otherwise. The binary:
# FILEVOL_BIN, else a debug build.
set -euo pipefail
cd "$(dirname "$0")/../.."

component=deploy/kubernetes/components/monitoring
if ! command -v promtool >/dev/null; then
  echo "alerts: promtool not found (apt install prometheus, or scripts/install-deps.sh)" >&2
  exit 1
fi
if [[ -z ${FILEVOL_BIN:-} ]]; then
  cargo build --locked --quiet --bin filevol
  FILEVOL_BIN=${CARGO_TARGET_DIR:-$PWD/target}/debug/filevol
fi
venv=${FILEVOL_DEPLOY_VENV:-$PWD/target/deploy-venv}
if ! "$venv/bin/python" -c 'import yaml' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/check/requirements.txt
fi

work=$(mktemp -d)
pid=
cleanup() {
  [[ -z $pid ]] || kill "$pid" 2>/dev/null || true
  [[ -z $pid ]] || wait "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# The component applied to the default layout renders, and what it adds
# fits it: the PodMonitor selects the controller's and the node plugin's
# pods, the dashboard's ConfigMap holds the dashboard as it is in git.
kubectl=$(command -v kubectl || true)
tools_kubectl=../shared/tools/k8s/bin/kubectl.xz
if [[ -z $kubectl && -f $tools_kubectl ]]; then
  mkdir -p target/tools
  [[ -x target/tools/kubectl ]] || { xz -dc "$tools_kubectl" >target/tools/kubectl.tmp && chmod +x target/tools/kubectl.tmp && mv target/tools/kubectl.tmp target/tools/kubectl; }
  kubectl=$PWD/target/tools/kubectl
fi
if [[ -n $kubectl ]]; then
  # kustomize takes only relative paths, so the layout is written where
  # ../../ is the repository.
  render=target/alerts-render
  rm -rf "$render" && mkdir -p "$render"
  printf '%s\n' 'apiVersion: kustomize.config.k8s.io/v1beta1' 'kind: Kustomization' \
    'resources: [../../deploy/kubernetes]' 'components: [../../deploy/kubernetes/components/monitoring]' \
    >"$render/kustomization.yaml"
  "$kubectl" kustomize "$render" >"$work/rendered.yaml"
  rm -rf "$render"
  "$venv/bin/python" - "$work/rendered.yaml" "$component/filevol-dashboard.json" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
kinds = {d["kind"]: d for d in docs}
for kind in ("PrometheusRule", "PodMonitor", "ConfigMap"):
    assert kind in kinds, f"alerts: the monitoring component renders no {kind}"
    assert kinds[kind]["metadata"].get("namespace") == "filevol", f"{kind} outside the filevol namespace"
want = kinds["PodMonitor"]["spec"]["selector"]["matchLabels"]
for workload in ("StatefulSet", "DaemonSet"):
    labels = kinds[workload]["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in want.items()), f"the PodMonitor does not select the {workload}'s pods"
cm = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "filevol-dashboard"][0]
assert cm["data"]["filevol-dashboard.json"] == open(sys.argv[2]).read(), "the dashboard ConfigMap differs from the file"
print("alerts: the monitoring component renders into the default layout and selects its pods")
PY
elif [[ ${CI:-} == true ]]; then
  echo "alerts: no kubectl and no ../shared/tools/k8s: the component cannot be rendered (CI=true: failing)" >&2
  exit 1
else
  echo "alerts: kubectl not found: the component is not rendered" >&2
fi

# The rules as a plain rule file, beside the tests that name it.
"$venv/bin/python" - "$component/prometheusrule.yaml" "$work/rules.yaml" <<'PY'
import sys, yaml
rule = yaml.safe_load(open(sys.argv[1]))
yaml.safe_dump({"groups": rule["spec"]["groups"]}, open(sys.argv[2], "w"), sort_keys=False)
PY
cp scripts/check/alerts-test.yaml "$work/"
promtool check rules "$work/rules.yaml"
(cd "$work" && promtool test rules alerts-test.yaml)

# What a filevol serving both halves exports, from its own /metrics.
mkdir -p "$work/pool" "$work/kubelet"
port=$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$FILEVOL_BIN" serve --mode all --endpoint "unix://$work/csi.sock" --pool "$work/pool" \
  --node-id alerts-check --kubelet-dir "$work/kubelet" --metrics-address "127.0.0.1:$port" \
  2>"$work/filevol.log" &
pid=$!
"$venv/bin/python" - "$port" "$work/metrics.txt" <<'PY'
import sys, time, urllib.request
port, dest = sys.argv[1], sys.argv[2]
for _ in range(100):
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        open(dest, "wb").write(text)
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("alerts: filevol's /metrics did not answer")
PY

"$venv/bin/python" - "$work/metrics.txt" "$work/rules.yaml" "$component/filevol-dashboard.json" <<'PY'
import json, re, sys, yaml

exported = set()
for line in open(sys.argv[1]):
    if line.startswith("# TYPE "):
        _, _, name, kind = line.split()
        exported.add(name)
        if kind == "histogram":
            exported.update(name + s for s in ("_bucket", "_sum", "_count"))

exprs = []
for group in yaml.safe_load(open(sys.argv[2]))["groups"]:
    for rule in group["rules"]:
        exprs.append((f"rule {rule.get('alert') or rule.get('record')}", rule["expr"]))
dash = json.load(open(sys.argv[3]))
def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))
for p in panels(dash["panels"]):
    for t in p.get("targets", []):
        exprs.append((f"panel {p['title']!r}", t["expr"]))
for v in dash.get("templating", {}).get("list", []):
    q = v.get("query")
    if isinstance(q, dict):
        exprs.append((f"variable {v['name']}", q["query"]))

KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
            "group_right", "bool", "offset", "inf", "nan"}
def names(expr):
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)        # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)                   # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)                  # ranges
    expr = re.sub(r"\blabel_values\(\s*([^,)]+),[^)]*\)", r"\1", expr)  # Grafana's
    expr = re.sub(r"(?<![\w.])(\d+(ms|s|m|h|d|w|y))+\b", "0", expr)  # durations
    expr = re.sub(r"(?<![\w.])\d+(\.\d+)?([eE][-+]?\d+)?", "0", expr)  # numbers
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        word = m.group(0)
        rest = expr[m.end():].lstrip()
        if rest.startswith("(") or word.lower() in KEYWORDS or word.startswith("$"):
            continue
        if expr[max(0, m.start() - 1)] == "$":
            continue
        yield word

# The extraction itself, on the shapes the queries use: a name it missed
# would pass unchecked.
assert list(names('topk(10, rate(filevol_a_total{pod=~"$pod",x="y(z)"}[5m]) / clamp_min(b, 1e-9))')) == ["filevol_a_total", "b"]
assert list(names('histogram_quantile(0.99, sum by (le, rpc) (rate(c_bucket[5m]))) > 10')) == ["c_bucket"]
assert list(names("label_values(d, pod)")) == ["d"]
assert list(names("e == 1 and on (pod) f unless g offset 5m")) == ["e", "f", "g"]

bad = []
checked = set()
for where, expr in exprs:
    for name in names(expr):
        checked.add(name)
        if name not in exported:
            bad.append(f"{where}: {name} is not a metric filevol exports")
if bad:
    sys.exit("alerts: " + "\n  ".join(["queries name metrics filevol does not export:"] + bad))
print(f"alerts: {len(exprs)} queries name {len(checked)} metrics, every one exported by filevol")
PY
