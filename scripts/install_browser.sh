#!/usr/bin/env bash
# Install the browser the review page's browser test drives: Debian's `chromium` package
# (Playwright's own browser download is not used). Needs root and apt; anywhere else this
# does nothing and that test skips, saying why.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null; then
  echo "installed chromium for the browser test"
else
  echo "could not install chromium: the browser test will skip" >&2
fi
