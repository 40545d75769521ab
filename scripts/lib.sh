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
# One dpkg-query for all of them: these checks run on every `hvtrace run`
# (through the cached build scripts), where each process costs the user.
hv_apt_install() {
    local missing=()
    local p status installed=$'\n'
    # dpkg-query fails on a package it has never heard of: that one is missing.
    while read -r p status; do
        [ "$status" = "install ok installed" ] && installed+="$p"$'\n'
    done < <(dpkg-query -W -f='${Package} ${Status}\n' "$@" 2>/dev/null || true)
    for p in "$@"; do
        case $installed in *$'\n'"$p"$'\n'*) ;; *) missing+=("$p") ;; esac
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

# sha256 of the given strings and files, as one hex digest: the digest of
# one line per argument (a string as itself, a file as sha256sum prints
# it). Runs of files are hashed by one sha256sum, which prints the same
# lines as one call per file: the keys of existing caches stay valid.
hv_hash() {
    local digest
    digest=$(hv_hash_lines "$@" | sha256sum)
    echo "${digest:0:16}"
}

# The lines hv_hash digests.
hv_hash_lines() {
    local x
    local -a run=()
    for x in "$@"; do
        if [ -f "$x" ]; then
            run+=("$x")
            continue
        fi
        [ ${#run[@]} -eq 0 ] || sha256sum -- "${run[@]}"
        run=()
        printf '%s\n' "$x"
    done
    [ ${#run[@]} -eq 0 ] || sha256sum -- "${run[@]}"
}

# Make bookworm-backports (Debian's 6.12 kernels, newer QEMU) known to apt,
# idempotently. A fresh Debian 12 machine lists only bookworm and its
# updates; the suite is added in a file of its own, with the archive URI
# the system already uses, and apt's default backports priority (100), so
# nothing is ever upgraded from it unless asked for by version.
hv_apt_backports() {
    if grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return 0
    fi
    local uri
    uri=$(awk '/^URIs:/ && /debian\/?$/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$uri" ] || uri=http://deb.debian.org/debian
    hv_log "adding bookworm-backports ($uri) to apt's sources"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" |
        $sudo tee /etc/apt/sources.list.d/hvtrace-bookworm-backports.sources >/dev/null
    $sudo apt-get update -qq >&2
}

# The kernel package a Debian meta-package (linux-image-amd64, ...) depends
# on now, and its candidate version, as "PACKAGE VERSION"; the package
# lists are refreshed once if the meta-package is unknown. Fails if apt
# cannot resolve it.
hv_debian_kernel_package() {
    local meta=$1 pkg
    resolve() {
        apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}' || true
    }
    pkg=$(resolve)
    if [ -z "$pkg" ]; then
        apt-get update -qq >&2 || true
        pkg=$(resolve)
    fi
    [ -n "$pkg" ] || return 1
    echo "$pkg $(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')"
}

# Downloads Debian's package PKG at VERSION and unpacks it into DIR.
hv_deb_unpack() {
    local pkg=$1 version=$2 dir=$3 dl
    dl=$(mktemp -d "${TMPDIR:-/tmp}/hvtrace-deb-dl.XXXXXX")
    (cd "$dl" && apt-get download -qq "$pkg=$version" >&2) || { rm -rf "$dl"; return 1; }
    dpkg-deb -x "$dl"/*.deb "$dir" || { rm -rf "$dl"; return 1; }
    rm -rf "$dl"
}
