# Shared helpers for hvtrace's build scripts (sourced, not run).
# shellcheck shell=bash

# Root of hvtrace's content-addressed cache (kernels, images, snapshots).
hv_cache_dir() {
    echo "${HVTRACE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvtrace}"
}

# Print a progress line on stderr (stdout carries the script's result).
hv_log() {
    echo "[hvtrace] $*" >&2
}

# Install Debian packages that are not installed yet (idempotent, quiet).
hv_apt_install() {
    local missing=()
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    hv_log "installing Debian packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    # A stale package list fails the install; refresh it once and retry.
    if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2; then
        $sudo apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2
    fi
}

# sha256 of the given strings and files, as one hex digest.
hv_hash() {
    local x
    for x in "$@"; do
        if [ -f "$x" ]; then sha256sum "$x"; else printf '%s\n' "$x"; fi
    done | sha256sum | cut -c1-16
}
