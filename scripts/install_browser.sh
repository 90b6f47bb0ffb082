#!/usr/bin/env bash
# Install the browser the review page's browser test drives: Debian's `chromium` package
# (Playwright's own browser download is not used). A no-op when chromium is there. Needs
# root and apt; without them it only says so, and that test skips, saying why.
# Exit status: 0 when chromium is there or cannot be installed here, 1 when an install failed.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "no chromium, and installing it needs root and apt: the browser test will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null; then
  echo "installed chromium for the browser test"
else
  echo "could not install chromium: the browser test will skip" >&2
  exit 1
fi
