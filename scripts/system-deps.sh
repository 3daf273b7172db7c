#!/usr/bin/env bash
# The system packages rlm's tests need, on Debian or Ubuntu: bubblewrap and libseccomp2 (the
# `bwrap` and `strict` sandbox levels) and chromium with chromium-driver (the viewer's browser
# test). Installs them only when something is missing, running `apt-get update` once first;
# as root directly, otherwise through sudo. Safe to run again: with everything there it does
# nothing and needs no privilege.
set -euo pipefail

packages=(bubblewrap libseccomp2 chromium chromium-driver)

on_path() {
    local name
    for name in "$@"; do
        command -v "$name" >/dev/null 2>&1 && return 0
    done
    return 1
}

missing=()
on_path bwrap || missing+=(bubblewrap)
# find_library asks the dynamic linker's cache (ldconfig), wherever ldconfig lives.
python3 -c 'import ctypes.util, sys; sys.exit(not ctypes.util.find_library("seccomp"))' || missing+=(libseccomp2)
on_path chromium chromium-browser google-chrome google-chrome-stable || missing+=(chromium)
on_path chromedriver || missing+=(chromium-driver)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: missing ${missing[*]}, and this system has no apt-get: install the equivalents of" \
        "${packages[*]} with its package manager" >&2
    exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
else
    echo "system-deps: missing ${missing[*]}; installing needs root, and sudo is not installed." \
        "As root, run: apt-get update && apt-get install -y ${packages[*]}" >&2
    exit 1
fi
echo "system-deps: installing ${packages[*]} (missing: ${missing[*]})" >&2
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
