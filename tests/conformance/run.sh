#!/usr/bin/env bash
# Runs the OpenAI Python SDK conformance test, then the Node SDK's (tests/conformance/node), against
# imagegate and the fake upstream.
#
#   tests/conformance/run.sh [pytest args...]
#
# Creates (or reuses) a venv at tests/conformance/.venv-conformance, installs requirements.txt
# into it when that file changed, builds the two binaries, runs pytest, then the Node suite (`npm ci`
# installs the pinned `openai` package into tests/conformance/node/node_modules). Fails when either
# fails. Env: PYTHON (interpreter for the venv, default python3); IMAGEGATE_BIN_DIR (use prebuilt
# binaries from that folder and skip the cargo build).
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
    (cd "$root" && cargo build -p imagegate -p fake-openai -p engine --bins --example tiny_checkpoint)
else
    IMAGEGATE_BIN_DIR="$(cd "$IMAGEGATE_BIN_DIR" && pwd)"
    export IMAGEGATE_BIN_DIR
fi

cd "$here"
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$here" "$@"

# The official Node SDK (the version package-lock.json pins), on node's own test runner.
if command -v npm > /dev/null; then
    (cd "$here/node" && npm ci --no-audit --no-fund --loglevel=error && npm test --silent)
elif [ -n "${CI:-}" ]; then
    echo "run.sh: npm is missing: the Node SDK conformance suite cannot run" >&2
    exit 1
else
    echo "run.sh: SKIPPED the Node SDK conformance suite: install Node.js 20+ and npm to run it" >&2
fi
