#!/usr/bin/env bash
# Creates (or reuses) the benchmark venv at <repo>/.venv-bench and installs bench/requirements.txt
# into it when that file changed since the last install. Idempotent; safe to run before every bench.
#
#   bench/setup.sh
#
# Env: PYTHON (interpreter for the venv, default python3; needs >= 3.11 for torch 2.15).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="$root/.venv-bench"

if [ ! -x "$venv/bin/python" ]; then
    echo "setup.sh: creating $venv" >&2
    "${PYTHON:-python3}" -m venv "$venv"
fi
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "setup.sh: installing bench/requirements.txt (torch is large; first run takes minutes)" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$here/requirements.txt"
    echo "$want" > "$stamp"
fi
