#!/usr/bin/env bash
# Fill a wheelhouse for the offline image build: our package's wheel plus every runtime
# dependency as a binary wheel, pinned by deploy/constraints.txt (torch is the local CPU wheel).
#   deploy/wheelhouse.sh [DIR]      DIR defaults to .whl/ (git-ignored), what the Dockerfile reads
# The image then installs with `pip install --no-index`: nothing is fetched while building it.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$(mkdir -p "${1:-$repo/.whl}" && cd "${1:-$repo/.whl}" && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
[ -x "$py" ] || py=python3

rm -f "$out"/qserve-*.whl  # same version number, new code: never let pip pick a stale build
"$py" -m pip wheel --quiet --no-deps --wheel-dir "$out" "$repo"
mapfile -t deps < <("$py" - "$repo/pyproject.toml" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
PY
)
"$py" -m pip download --quiet --only-binary=:all: --dest "$out" \
  --constraint "$repo/deploy/constraints.txt" "${deps[@]}"
echo "wheelhouse: $out ($(find "$out" -name '*.whl' | wc -l) wheels, $(du -sh "$out" | cut -f1))"
