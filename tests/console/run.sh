#!/usr/bin/env bash
# The usage console in a real browser: Debian's Chromium (headless), driven by Playwright
# (playwright-core, pinned in package-lock.json; it downloads no browser), against `imagegate serve`
# and the fake upstream.
#
#   tests/console/run.sh
#
# Env: IMAGEGATE_BIN_DIR (prebuilt binaries; else they are built); CHROMIUM (the browser, default
# /usr/bin/chromium: `apt-get install chromium` on Debian, which .ci/run does); CONSOLE_SCREENSHOT
# (write the console's screenshot there). Without a browser or npm it says so and, outside CI, skips.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
browser="${CHROMIUM:-/usr/bin/chromium}"

missing=""
[ -x "$browser" ] || missing="Chromium ($browser; Debian: apt-get install chromium)"
command -v npm > /dev/null || missing="${missing:+$missing and }npm (Node.js 20+)"
if [ -n "$missing" ]; then
    if [ -n "${CI:-}" ]; then
        echo "console/run.sh: $missing is missing: the browser tests cannot run" >&2
        exit 1
    fi
    echo "console/run.sh: SKIPPED the console's browser tests: install $missing to run them" >&2
    exit 0
fi

if [ -z "${IMAGEGATE_BIN_DIR:-}" ]; then
    (cd "$root" && cargo build -p imagegate -p fake-openai --bins)
else
    IMAGEGATE_BIN_DIR="$(cd "$IMAGEGATE_BIN_DIR" && pwd)"
    export IMAGEGATE_BIN_DIR
fi
export CHROMIUM="$browser"
cd "$here"
npm ci --no-audit --no-fund --loglevel=error
npm test --silent
