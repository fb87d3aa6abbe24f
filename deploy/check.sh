#!/usr/bin/env bash
# Prove the deployment artefacts on this machine, offline apart from Debian and PyPI:
#  1. static: hadolint both Dockerfiles, yamllint deploy/, `helm lint --strict` and strict
#     Kubernetes schema validation of the chart (default and ci/ values) for every version in
#     K8S_VERSIONS, and deploy/k8s/ re-rendered and diffed against the chart;
#  2. container: build the image on a locally made Debian base from an offline wheelhouse, run it
#     with a tiny model mounted on 127.0.0.1 (read-only root, memory limit, API key), then
#     deploy/smoke.py: /ready, a chat completion through the `openai` client, /metrics, the auto
#     budget read from the cgroup, and SIGTERM during a streamed request (it must finish, exit 0).
# Exits non-zero on any failure. When podman cannot be installed or run at all, or its storage has
# too little free disk for the build (QSERVE_CHECK_DISK_MB), part 2 prints SKIP and the script
# exits 0 after part 1. Tools, caches and podman storage stay outside the repo.
set -euo pipefail
START=$SECONDS
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export TOOLS=${TOOLS:-/tmp/qserve-tools}
CACHE=${QSERVE_DEPLOY_CACHE:-/var/tmp/qserve-deploy}
PY=${PYTHON:-$repo/.venv/bin/python}
K8S_VERSIONS=${K8S_VERSIONS:-1.30.0 1.33.0 1.37.0}
BASE_IMAGE=localhost/qserve-base:bookworm
IMAGE=localhost/qserve:check
CTR=qserve-check-$$
MEM_LIMIT=$((3 * 1024 * 1024 * 1024))
API_KEY=sk-check-$$
export CONTAINERS_CONF=$repo/deploy/containers.conf
work=$(mktemp -d /tmp/qserve-check.XXXXXX)
status=fail

log() { printf '== [%4ds] %s\n' $((SECONDS - START)) "$*"; }
finish() {
  if [ -n "${started_ctr:-}" ]; then
    [ "$status" = ok ] || podman logs --tail 40 "$CTR" 2>&1 | sed 's/^/   container| /' || true
    podman rm -f "$CTR" >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
  log "deploy/check.sh: $status (total $((SECONDS - START)) s)"
}
trap finish EXIT
# Run a noisy command with its output in a log, shown only when it fails.
quiet() {
  local name=$1; shift
  if ! "$@" >"$work/$name.log" 2>&1; then
    tail -40 "$work/$name.log" | sed "s/^/   $name| /"
    return 1
  fi
}

# ---- 1. static checks -------------------------------------------------------------------------
log "tools (hadolint, yamllint, kubernetes-validate, helm) into $TOOLS"
quiet tools deploy/install-tools.sh lint
export PATH=$TOOLS/bin:$TOOLS/venv/bin:$PATH
chart=deploy/helm/qserve

log "hadolint Dockerfile deploy/Dockerfile.cuda"
hadolint Dockerfile deploy/Dockerfile.cuda
log "yamllint deploy/"
yamllint --strict -c deploy/.yamllint deploy/

value_sets=("" "$chart"/ci/*-values.yaml)
for values in "${value_sets[@]}"; do
  args=(); [ -n "$values" ] && args=(-f "$values")
  label=${values:-default values}
  log "helm lint --strict + kubernetes-validate --strict ($label; k8s $K8S_VERSIONS)"
  quiet helm-lint helm lint --strict "$chart" "${args[@]}"
  helm template qserve "$chart" "${args[@]}" >"$work/rendered.yaml"
  for k in $K8S_VERSIONS; do
    # ServiceMonitor is a CRD without a bundled schema: reported as a warning, hidden here.
    kubernetes-validate --strict --quiet --no-warn -k "$k" "$work/rendered.yaml"
  done
done
log "chart refuses bad values"
for bad in resources.limits.memory=null model.source=s3 model.sorce=pvc server.memoryBudget=lots; do
  if helm template qserve "$chart" --set "$bad" >/dev/null 2>&1; then
    echo "chart rendered with --set $bad; it must refuse it" >&2; exit 1
  fi
done
log "deploy/k8s/qserve.yaml in step with the chart"
HELM=helm deploy/render-k8s.sh --check
for k in $K8S_VERSIONS; do kubernetes-validate --strict --quiet -k "$k" deploy/k8s/qserve.yaml; done

# ---- 2. the container -------------------------------------------------------------------------
log "podman"
if ! quiet podman-install deploy/install-tools.sh podman; then
  status="ok (container part SKIPPED: podman could not be installed)"
  echo "SKIP: podman could not be installed (apt-get failed or not root); static checks passed"
  exit 0
fi
if ! podman info >"$work/podman-info.log" 2>&1; then
  status="ok (container part SKIPPED: podman cannot run here)"
  echo "SKIP: podman is installed but cannot run here: $(tail -1 "$work/podman-info.log")"
  exit 0
fi
[ -x "$PY" ] || { echo "no Python at $PY (set PYTHON= to one with qserve, openai, prometheus-client)" >&2; exit 1; }

if ! podman image exists "$BASE_IMAGE"; then
  log "base image $BASE_IMAGE (debootstrap bookworm minbase + python3)"
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  rootfs=$CACHE/rootfs
  rm -rf "$rootfs"
  mkdir -p "$CACHE"
  quiet debootstrap debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "${mirror:-http://deb.debian.org/debian}"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | quiet import podman import --change 'CMD ["python3"]' - "$BASE_IMAGE"
  rm -rf "$rootfs"
fi

log "wheelhouse (our wheel + pinned deps) in $CACHE/wheels"
quiet wheelhouse env PYTHON="$PY" deploy/wheelhouse.sh "$CACHE/wheels"

# The build peaks at ~4.5 GB of disk for the 1.3 GB image (the venv in the build container, the
# layer blob, the committed layer). A previous image saves nothing (--layers=false) and holds
# another 1.3 GB, so it goes first. CI once ran out of disk exactly here.
podman rmi "$IMAGE" >/dev/null 2>&1 || true
podman image prune -f >/dev/null 2>&1 || true
graphroot=$(podman info --format '{{.Store.GraphRoot}}')
need_mb=${QSERVE_CHECK_DISK_MB:-5000}
free_mb=$(df -Pm "$graphroot" | awk 'NR == 2 {print $4}')
if [ "$free_mb" -lt "$need_mb" ]; then
  status="ok (container part SKIPPED: $free_mb MB free under $graphroot, the build needs $need_mb)"
  echo "SKIP: only $free_mb MB free under $graphroot; building the image needs ~$need_mb MB" \
    "(static checks passed; free some disk and re-run to build and smoke-test the image)"
  exit 0
fi
log "podman build $IMAGE ($free_mb MB free under $graphroot)"
# --layers=false: no layer cache (the wheels arrive through a bind mount, which a cached layer
# would not notice) and no intermediate images left behind; --format docker keeps HEALTHCHECK.
quiet build podman build --layers=false --pull=never --format docker \
  --build-arg BASE_IMAGE="$BASE_IMAGE" --build-context wheels="$CACHE/wheels" -t "$IMAGE" .
user=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
[ "${user%%:*}" != 0 ] && [ -n "$user" ] || { echo "image runs as root ($user)" >&2; exit 1; }
echo "   image $(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}'), user $user"

log "tiny model + container on 127.0.0.1"
quiet make-tiny "$PY" -m qserve.cli make-tiny --out "$work/model"
chmod -R a+rX "$work/model"  # the container user is not the files' owner
port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# Same constraints as the Helm chart: non-root, read-only root, no capabilities, memory limit.
started_ctr=1
podman run -d --init --name "$CTR" --read-only --cap-drop=ALL --security-opt=no-new-privileges \
  --memory "$MEM_LIMIT" -p "127.0.0.1:$port:8000" -v "$work/model:/models/model:ro" \
  -e QSERVE_API_KEY="$API_KEY" -e QSERVE_DRAIN_DELAY=1 "$IMAGE" >/dev/null 2>"$work/run.log" \
  || { cat "$work/run.log"; exit 1; }

log "smoke test (deploy/smoke.py)"
"$PY" deploy/smoke.py --base-url "http://127.0.0.1:$port" --container "$CTR" \
  --memory-limit "$MEM_LIMIT" --api-key "$API_KEY"
status=ok
