#!/usr/bin/env bash
# Validates the deployment files without a cluster or a container engine:
#
#   1. installs pinned helm and kube-score with `go install` from the Go
#      module proxy into ${TOLLGUARD_CACHE:-$HOME/.cache/tollguard}/gobin
#      (outside the clone; skipped when the pinned build is already there);
#   2. `helm lint --strict` of helm/tollguard with every ci/*-values.yaml;
#   3. `helm template` of every ci/*-values.yaml, plain and with the optional
#      APIs (monitoring.coreos.com/v1, keda.sh/v1alpha1), and checks that the
#      chart refuses to render without the pseudonymisation key;
#   4. kube-score on every rendered manifest set (checks and exclusions in
#      deploy/k8s/kube-score.conf);
#   5. consistency: every workspace member is copied by the Dockerfile, the
#      chart's default rules equal deploy/examples/rules.toml, the chart
#      README documents values.yaml, the Grafana dashboard queries exactly the
#      metrics the services register, deploy/compose/docker-compose.yml loads
#      with compose-go (the loader of `docker compose`, built from
#      deploy/compose/check), and the compose configs pass the binaries'
#      --check-config when the binaries are built.
#
# kube-linter (golang.stackrox.io/kube-linter) is the usual tool for step 4,
# but the Go module proxy reachable here does not serve that module path, so
# kube-score (github.com/zegl/kube-score), which covers the same ground
# (security context, probes, resources, PDB/HPA/NetworkPolicy targeting,
# anti-affinity, image tags), is used instead.
#
#   bash deploy/k8s/validate.sh            # everything; non-zero on any failure
#   TOLLGUARD_KEEP_RENDERED=1 bash deploy/k8s/validate.sh   # keep the output
#
# Exports nothing; prints a summary. The rendered manifests go to a temporary
# directory (printed with TOLLGUARD_KEEP_RENDERED=1).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

HELM_VERSION=v3.22.0
# helm's default Kubernetes version for `helm template`/`lint` is set at link
# time from its client-go (v0.37.0 in helm v3.22.0 -> Kubernetes 1.37), as
# helm's own Makefile does; without it helm assumes 1.20.
HELM_K8S_MINOR=37
KUBE_SCORE_VERSION=v1.20.0

# The Go toolchain of this machine kind lives in /usr/local/go.
if ! command -v go >/dev/null && [[ -x /usr/local/go/bin/go ]]; then
  export PATH="/usr/local/go/bin:$PATH"
fi

CACHE="${TOLLGUARD_CACHE:-$HOME/.cache/tollguard}"
GOBIN_DIR="$CACHE/gobin"
HELM="$GOBIN_DIR/helm"
KUBE_SCORE="$GOBIN_DIR/kube-score"
CHART="helm/tollguard"

started=$(date +%s)
say() { printf '[validate] %s\n' "$*" >&2; }
step() { say "$(( $(date +%s) - started ))s: $*"; }

failures=()
passes=0
pass() { passes=$((passes + 1)); }
fail() { failures+=("$1"); say "FAIL: $1"; }

# ---------------------------------------------------------------------------
# 1. tools

helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION \
-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$HELM_K8S_MINOR \
-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$HELM_K8S_MINOR"
ks_ldflags="-s -w -X main.version=$KUBE_SCORE_VERSION"

# install NAME PACKAGE@VERSION LDFLAGS: builds unless the stamp matches.
install_tool() {
  local name=$1 pkg=$2 ldflags=$3 bin="$GOBIN_DIR/$1" stamp="$GOBIN_DIR/.$1.stamp"
  local want="$pkg $ldflags $(go env GOVERSION 2>/dev/null)"
  if [[ -x $bin && -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
    step "$name: cached ($pkg)"
    return 0
  fi
  command -v go >/dev/null || { fail "go is not installed: needed to build $name"; return 1; }
  step "$name: building $pkg (first time only; takes a few minutes on 2 cores)"
  local t0=$(date +%s) tmp
  tmp=$(mktemp -d)
  # Build from a scratch directory so no go.mod of ours is involved.
  if (cd "$tmp" && CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOBIN="$GOBIN_DIR" \
        go install -trimpath -ldflags "$ldflags" "$pkg" >"$tmp/log" 2>&1); then
    printf '%s' "$want" > "$stamp"
    step "$name: built in $(( $(date +%s) - t0 ))s"
    rm -rf "$tmp"
  else
    tail -n 30 "$tmp/log" >&2
    rm -rf "$tmp"
    fail "could not build $name ($pkg)"
    return 1
  fi
}

mkdir -p "$GOBIN_DIR"
install_tool helm "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" "$helm_ldflags" || true
install_tool kube-score "github.com/zegl/kube-score/cmd/kube-score@$KUBE_SCORE_VERSION" "$ks_ldflags" || true
if [[ ! -x $HELM ]]; then
  say "helm is missing; cannot go on"
  exit 1
fi
say "helm $("$HELM" version --template '{{.Version}}'), kube-score $KUBE_SCORE_VERSION"

# ---------------------------------------------------------------------------
# 2. helm lint --strict with every scenario

OUT=$(mktemp -d)
if [[ "${TOLLGUARD_KEEP_RENDERED:-0}" == 1 ]]; then
  say "rendered manifests kept in $OUT"
else
  trap 'rm -rf "$OUT"' EXIT
fi

shopt -s nullglob
scenarios=("$CHART"/ci/*-values.yaml)
if [[ ${#scenarios[@]} -eq 0 ]]; then
  fail "no $CHART/ci/*-values.yaml scenarios"
fi

# (helm lint has no --api-versions; the optional objects are checked by the
# template runs below.)
OPTIONAL_APIS=(--api-versions monitoring.coreos.com/v1 --api-versions monitoring.coreos.com/v1/ServiceMonitor
               --api-versions keda.sh/v1alpha1 --api-versions keda.sh/v1alpha1/ScaledObject)

for f in "${scenarios[@]}"; do
  s=$(basename "$f" -values.yaml)
  step "helm lint --strict ($s)"
  if "$HELM" lint --strict "$CHART" -f "$f" >"$OUT/lint-$s.log" 2>&1; then
    pass
  else
    cat "$OUT/lint-$s.log" >&2
    fail "helm lint --strict $CHART -f $f"
  fi
done

# ---------------------------------------------------------------------------
# 3. helm template with every scenario, plain and with the optional APIs

rendered=()
for f in "${scenarios[@]}"; do
  s=$(basename "$f" -values.yaml)
  step "helm template ($s)"
  if "$HELM" template tollguard "$CHART" -n tollguard -f "$f" >"$OUT/$s.yaml" 2>"$OUT/$s.err"; then
    pass; rendered+=("$OUT/$s.yaml")
  else
    cat "$OUT/$s.err" >&2; fail "helm template -f $f"
  fi
  if "$HELM" template tollguard "$CHART" -n tollguard -f "$f" "${OPTIONAL_APIS[@]}" \
       >"$OUT/$s-apis.yaml" 2>"$OUT/$s-apis.err"; then
    pass; rendered+=("$OUT/$s-apis.yaml")
  else
    cat "$OUT/$s-apis.err" >&2; fail "helm template -f $f ${OPTIONAL_APIS[*]}"
  fi
done

# The optional objects render only with their APIs.
if [[ -f $OUT/ha.yaml && -f $OUT/ha-apis.yaml ]]; then
  for kind in ServiceMonitor ScaledObject; do
    if grep -q "^kind: $kind$" "$OUT/ha-apis.yaml" && ! grep -q "^kind: $kind$" "$OUT/ha.yaml"; then
      pass
    else
      fail "ha scenario: $kind must render with its API and only then"
    fi
  done
  if grep -q '^kind: HorizontalPodAutoscaler$' "$OUT/ha.yaml"; then pass; else fail "ha scenario renders no HPA"; fi
fi

# No key, no chart: the render must fail and say how to provide one.
step "helm template without a key must fail"
if "$HELM" template tollguard "$CHART" --set kafka.bootstrap=kafka:9092 \
     --set 'ingester.carriers[0].providerId=kpn' --set 'ingester.carriers[0].homeCountry=NL' \
     >/dev/null 2>"$OUT/nokey.err"; then
  fail "the chart rendered without pseudonymization.key or pseudonymization.existingSecret"
elif grep -q "pseudonymization.existingSecret" "$OUT/nokey.err"; then
  pass
else
  cat "$OUT/nokey.err" >&2; fail "the no-key failure does not name pseudonymization.existingSecret"
fi

# ---------------------------------------------------------------------------
# 4. kube-score

if [[ -x $KUBE_SCORE ]]; then
  ks_args=()
  while read -r line; do
    line="${line%%#*}"; line="${line//[[:space:]]/}"
    [[ -z $line ]] && continue
    case "$line" in
      ignore:*) ks_args+=(--ignore-test "${line#ignore:}") ;;
      enable:*) ks_args+=(--enable-optional-test "${line#enable:}") ;;
      *) fail "deploy/k8s/kube-score.conf: cannot read '$line'" ;;
    esac
  done < deploy/k8s/kube-score.conf
  for r in "${rendered[@]}"; do
    s=$(basename "$r" .yaml)
    step "kube-score ($s)"
    if "$KUBE_SCORE" score "${ks_args[@]}" --output-format ci --exit-one-on-warning \
         --kubernetes-version "v1.$HELM_K8S_MINOR" "$r" >"$OUT/kube-score-$s.log" 2>&1; then
      pass
    else
      grep -Ev '^\[OK\]|^\[SKIPPED\]' "$OUT/kube-score-$s.log" >&2
      fail "kube-score on the $s rendering"
    fi
  done
else
  fail "kube-score is missing"
fi

# ---------------------------------------------------------------------------
# 5. consistency checks

step "Dockerfile copies every workspace member"
members=$(sed -n '/^members *= *\[/,/^\]/p' Cargo.toml | grep -o '"[^"]*"' | tr -d '"')
for m in $members; do
  if grep -Eq "^COPY +$m/Cargo.toml +$m/Cargo.toml" Dockerfile; then pass
  else fail "Dockerfile does not COPY $m/Cargo.toml (workspace member) into the dependency layer"; fi
done

step "chart default rules equal deploy/examples/rules.toml"
if cmp -s "$CHART/files/rules.toml" deploy/examples/rules.toml; then pass
else fail "$CHART/files/rules.toml differs from deploy/examples/rules.toml (copy it over)"; fi

PY=$(command -v python3 || true)
if [[ -n $PY ]]; then
  step "chart README documents the current values.yaml"
  if "$PY" deploy/k8s/values_table.py --check; then pass
  else fail "helm/tollguard/README.md parameters table is stale (python3 deploy/k8s/values_table.py)"; fi

  step "Grafana dashboard: valid JSON, metric names exist in the services"
  if "$PY" - <<'EOF' >&2; then pass; else fail "deploy/grafana/tollguard-dashboard.json"; fi
import json, pathlib, re
dash = json.loads(pathlib.Path("deploy/grafana/tollguard-dashboard.json").read_text())
exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
assert exprs, "no queries"
# metrics registered by the services (prometheus-client, prefix tollguard_)
registered = set()
for f in pathlib.Path("services").rglob("*.rs"):
    registered |= set(re.findall(r'register\(\s*"([a-z0-9_]+)"', f.read_text()))
used = set()
for e in exprs:
    for m in re.findall(r"\btollguard_([a-z0-9_]+)", e):
        used.add(re.sub(r"_(total|bucket|sum|count)$", "", m))
unknown = used - registered
assert not unknown, f"dashboard queries metrics no service registers: {sorted(unknown)}"
missing = registered - used
assert not missing, f"metrics with no dashboard panel: {sorted(missing)}"
print(f"dashboard: {len(dash['panels'])} panels, {len(exprs)} queries over {len(used)} TollGuard metrics")
EOF
else
  fail "python3 is missing (README table and dashboard checks)"
fi

# The compose file, loaded by compose-go (the loader of `docker compose`).
step "docker-compose.yml (compose-go loader)"
CHECK_SRC=deploy/compose/check
check_stamp="$(cat "$CHECK_SRC/go.mod" "$CHECK_SRC/go.sum" "$CHECK_SRC/main.go" | sha256sum | cut -c1-16) $(go env GOVERSION 2>/dev/null)"
if [[ ! -x $GOBIN_DIR/compose-check || "$(cat "$GOBIN_DIR/.compose-check.stamp" 2>/dev/null)" != "$check_stamp" ]]; then
  t0=$(date +%s)
  if (cd "$CHECK_SRC" && CGO_ENABLED=0 GOFLAGS=-buildvcs=false go build -trimpath -o "$GOBIN_DIR/compose-check" . >&2); then
    printf '%s' "$check_stamp" > "$GOBIN_DIR/.compose-check.stamp"
    step "compose-check built in $(( $(date +%s) - t0 ))s"
  fi
fi
if [[ -x $GOBIN_DIR/compose-check ]] && "$GOBIN_DIR/compose-check" deploy/compose/docker-compose.yml >&2; then pass
else fail "deploy/compose/docker-compose.yml"; fi

# The compose setup's service configs, checked by the binaries themselves
# when they are built (the Helm-rendered configs are checked the same way by
# tests/helm_chart.rs).
BIN_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollguard-target}/debug"
if [[ -x $BIN_DIR/tollguard-ingester && -x $BIN_DIR/tollguard-correlator && -x $BIN_DIR/tollguard-notifier ]]; then
  step "compose service configs pass --check-config"
  key=$(mktemp); printf '%064d' 7 > "$key"
  for cfg in deploy/compose/config/*.toml; do
    svc=$(basename "$cfg" .toml); bin="tollguard-${svc%%-*}"
    # the container paths of the key and of the mounted rules, moved here
    envs=(TOLLGUARD_LOG_FORMAT=text)
    grep -q '^key_file' "$cfg" && envs+=(TOLLGUARD__PSEUDONYMIZATION__KEY_FILE="$key")
    grep -q '^rules_file' "$cfg" && envs+=(TOLLGUARD__RULES_FILE=deploy/examples/rules.toml)
    grep -q '^policies_file' "$cfg" && envs+=(TOLLGUARD__POLICIES_FILE=deploy/examples/policies.toml)
    if env "${envs[@]}" "$BIN_DIR/$bin" --check-config --config "$cfg" >"$OUT/check-$svc.log" 2>&1; then pass
    else cat "$OUT/check-$svc.log" >&2; fail "$bin --check-config --config $cfg"; fi
  done
  rm -f "$key"
else
  say "note: service binaries not built in $BIN_DIR; compose configs not checked by --check-config (cargo build --workspace --bins)"
fi

# ---------------------------------------------------------------------------

total=$((passes + ${#failures[@]}))
say "----------------------------------------------------------------"
say "helm $HELM_VERSION, kube-score $KUBE_SCORE_VERSION; ${#scenarios[@]} scenarios; $(( $(date +%s) - started ))s"
if [[ ${#failures[@]} -eq 0 ]]; then
  echo "validate: $passes passed, 0 failed"
  exit 0
fi
for f in "${failures[@]}"; do say "  failed: $f"; done
echo "validate: $passes passed, ${#failures[@]} failed"
exit 1
