#!/usr/bin/env bash
# Install the Debian packages sftlab uses beyond Python, each only when missing:
# - chromium: the browser the review page's browser test drives (Playwright's own browser
#   download is not used);
# - libtcmalloc-minimal4: the memory allocator CPU training runs on (src/sftlab/train/allocator.py:
#   ~1.6x faster steps than glibc's malloc at the same peak memory).
# A no-op when both are there. Needs root and apt; without them it only says so (the browser
# test skips, CPU training runs on glibc's malloc).
# Exit status: 0 when everything is there or cannot be installed here, 1 when an install failed.
set -euo pipefail
need=()
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  need+=(chromium)
fi
libraries=$(ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null || true)
if [[ "$libraries" != *"libtcmalloc_minimal.so.4 "* ]]; then
  need+=(libtcmalloc-minimal4)
fi
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "missing ${need[*]}, and installing needs root and apt: the browser test will skip without chromium," \
       "CPU training runs on glibc's malloc without libtcmalloc-minimal4" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if apt-get update -qq >/dev/null && apt-get install -y -qq "${need[@]}" >/dev/null; then
  echo "installed ${need[*]}"
else
  echo "could not install ${need[*]}: the browser test will skip without chromium, CPU training runs on glibc's malloc" >&2
  exit 1
fi
