#!/usr/bin/env bash
# Headless Chromium for tests/test_report.py (it renders report.html in a real browser and is
# skipped, saying why, where no browser is installed). Installs Debian's `chromium` with
# apt-get when it is missing and apt-get can (root, or passwordless sudo); otherwise says so
# and exits 0: a machine without it still builds and tests everything else.
set -u
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_chromium: no apt-get here; the report's browser test will be skipped" >&2
  exit 0
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    echo "install_chromium: not root and no passwordless sudo; the report's browser test" \
         "will be skipped (apt-get install chromium)" >&2
    exit 0
  fi
fi
if "${SUDO[@]}" apt-get update -qq >/dev/null 2>&1 &&
   DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq chromium >/dev/null 2>&1
then
  echo "install_chromium: installed $(chromium --version 2>/dev/null)" >&2
else
  echo "install_chromium: apt-get could not install chromium; the report's browser test" \
       "will be skipped" >&2
fi
exit 0
