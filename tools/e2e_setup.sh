#!/usr/bin/env bash
# Installs what the browser test (tests/e2e) needs: Debian's Chromium and a font, never a
# browser download (Playwright drives /usr/bin/chromium through executable_path).
# Idempotent: does nothing when both are present. Used by .ci/run and `make e2e`.
# Without root or apt-get it says so and exits 0: the browser test then skips with that reason.
set -euo pipefail

have() { [ -x /usr/bin/chromium ] && [ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; }

if have; then
    echo "e2e setup: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) already installed"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "e2e setup: no apt-get here; install Chromium at /usr/bin/chromium by hand" \
         "(the browser test skips without it)" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "e2e setup: not root and no password-less sudo; run" \
             "'apt-get install -y chromium fonts-dejavu-core' as root (the browser test skips" \
             "without it)" >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
for attempt in 1 2 3; do
    if $SUDO apt-get update -q >/dev/null \
        && $SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core >/dev/null; then
        break
    fi
    echo "e2e setup: apt-get failed (attempt $attempt); retrying" >&2
    sleep $((attempt * 5))
done
if have; then
    echo "e2e setup: installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
else
    echo "e2e setup: Chromium could not be installed; the browser test will skip" >&2
fi
