#!/usr/bin/env bash
# Runs the OpenAI Python SDK conformance test against imagegate and the fake upstream.
#
#   tests/conformance/run.sh [pytest args...]
#
# Creates (or reuses) a venv at tests/conformance/.venv-conformance, installs requirements.txt
# into it when that file changed, builds the two binaries, then runs pytest. Exits with pytest's
# status. Env: PYTHON (interpreter for the venv, default python3); IMAGEGATE_BIN_DIR (use
# prebuilt binaries from that folder and skip the cargo build).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$here/.venv-conformance"

if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$here/requirements.txt"
    echo "$want" > "$stamp"
fi

if [ -z "${IMAGEGATE_BIN_DIR:-}" ]; then
    (cd "$root" && cargo build -p imagegate -p fake-openai --bins)
else
    IMAGEGATE_BIN_DIR="$(cd "$IMAGEGATE_BIN_DIR" && pwd)"
    export IMAGEGATE_BIN_DIR
fi

cd "$here"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$here" "$@"
