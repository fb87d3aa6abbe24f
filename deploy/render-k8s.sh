#!/usr/bin/env bash
# Render the chart's defaults into deploy/k8s/qserve.yaml (plain manifests for `kubectl apply`).
#   deploy/render-k8s.sh           rewrite the file
#   deploy/render-k8s.sh --check   fail if the committed file is out of step with the chart
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
helm=${HELM:-helm}
out=$repo/deploy/k8s/qserve.yaml
render() {
  echo "# Generated from deploy/helm/qserve with its default values by deploy/render-k8s.sh: do not"
  echo "# edit by hand. Apply with: kubectl apply -n NAMESPACE -f deploy/k8s/qserve.yaml"
  "$helm" template qserve "$repo/deploy/helm/qserve"
}
if [ "${1:-}" = "--check" ]; then
  if ! diff -u "$out" <(render); then
    echo "deploy/k8s/qserve.yaml is out of step with the chart: run deploy/render-k8s.sh" >&2
    exit 1
  fi
else
  render > "$out"
fi
