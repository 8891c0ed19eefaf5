#!/usr/bin/env bash
# Install headless Chromium for the dashboard's browser tests (Debian's `chromium` package, ~40 s).
#
# Idempotent: returns at once when a Chromium is on PATH or $TIDE_CHROMIUM names one. It never fails
# the caller: without root (or passwordless sudo) or apt-get it says how to install Chromium, and the
# browser tests then skip with that reason. The tests drive it over the DevTools protocol
# (dashboards/browser.py), so no chromedriver and no browser download are needed.
set -uo pipefail
for c in "${TIDE_CHROMIUM:-}" chromium chromium-browser google-chrome google-chrome-stable; do
  if [ -n "$c" ] && command -v "$c" >/dev/null 2>&1; then exit 0; fi
done
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "[install] no Chromium found and not root: install it (sudo apt-get install chromium) or set TIDE_CHROMIUM" >&2
    exit 0
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "[install] no Chromium found and no apt-get: install Chromium and/or set TIDE_CHROMIUM to its path" >&2
  exit 0
fi
echo "[install] installing chromium for the dashboard browser tests (apt-get, ~40 s)"
if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null; }; then
  echo "[install] apt-get install chromium failed; the browser tests will be skipped" >&2
fi
exit 0
