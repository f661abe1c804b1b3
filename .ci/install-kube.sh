#!/usr/bin/env bash
# Install what the Kubernetes discovery tests (tests/test_discovery.py) start
# themselves: etcd and kube-apiserver.
#
#   * etcd (+ etcdctl) from Debian (etcd-server, etcd-client). The package's own
#     daemon is never started nor used: the tests run their own etcd on free
#     127.0.0.1 ports with a temporary data directory (tests/kube.py).
#   * kube-apiserver: no registry ships it, so it is BUILT from Debian's
#     `kubernetes` source package (v1.20.2 in bookworm) with Debian's Go, and
#     cached OUTSIDE the repository:
#         ${DCGMRELAY_KUBE_CACHE:-$HOME/.cache/dcgmrelay/kube}/kube-apiserver
#     A cold machine pays the build once (about 5 minutes on 2 cores, 2.1 GB of
#     temporary disk, 1.3 GB peak RSS); later runs find the binary and skip it.
#
# Idempotent; safe to run concurrently (flock on the cache directory); needs no
# TTY. Needs root only when something must be installed with apt-get.
# The tests find the binary through $DCGMRELAY_KUBE_APISERVER, then the cache
# path above, then $PATH.
set -euo pipefail

CACHE="${DCGMRELAY_KUBE_CACHE:-${HOME:-/root}/.cache/dcgmrelay/kube}"
BIN="$CACHE/kube-apiserver"
export DEBIAN_FRONTEND=noninteractive

log() { printf 'install-kube: [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf 'install-kube: ERROR: %s\n' "$*" >&2; exit 1; }

apt_updated=""
apt_update() {
    if [ -z "$apt_updated" ]; then
        log "apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
}
apt_install() {
    [ "$(id -u)" -eq 0 ] || die "need root to apt-get install: $*"
    apt_update
    log "apt-get install $*"
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# ---------------------------------------------------------------------------
# 1. etcd + etcdctl (Debian). Keep postinst scripts from starting a daemon.
# ---------------------------------------------------------------------------
need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
if [ "${#need[@]}" -gt 0 ]; then
    made_policy=""
    if [ "$(id -u)" -eq 0 ] && [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    apt_install "${need[@]}"
    if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
# Never keep (or rely on) the package's default etcd on :2379.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now etcd >/dev/null 2>&1 || true
fi
if [ -x /etc/init.d/etcd ]; then /etc/init.d/etcd stop >/dev/null 2>&1 || true; fi
command -v etcd >/dev/null 2>&1 || die "etcd still missing after install"
log "etcd: $(etcd --version 2>/dev/null | head -n1)"

# ---------------------------------------------------------------------------
# 2. kube-apiserver: find or build.
# ---------------------------------------------------------------------------
binary_ok() { [ -x "$1" ] && "$1" --version >/dev/null 2>&1; }

mkdir -p "$CACHE"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$CACHE/.lock"
    if ! flock -n 9; then
        log "another install-kube is building; waiting for its lock ($CACHE/.lock)"
        flock 9
    fi
fi

if binary_ok "$BIN"; then
    log "kube-apiserver: cached $BIN ($("$BIN" --version 2>&1)); nothing to build"
    exit 0
fi

log "kube-apiserver: not in $CACHE; building from Debian's kubernetes source package (about 5 min)"
start=$(date +%s)

# deb-src lines for this Debian release (apt-get source needs them).
# shellcheck disable=SC1091
codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
[ -n "$codename" ] || die "cannot tell the Debian release from /etc/os-release"
has_deb_src() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && grep -qE '^[[:space:]]*(deb-src[[:space:]]|Types:.*deb-src)' "$f" && return 0
    done
    return 1
}
if ! has_deb_src; then
    [ "$(id -u)" -eq 0 ] || die "need root to add deb-src lines"
    log "adding deb-src lines for $codename (/etc/apt/sources.list.d/dcgmrelay-debian-src.sources)"
    cat > /etc/apt/sources.list.d/dcgmrelay-debian-src.sources <<EOF
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: $codename $codename-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: $codename-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    apt_updated=""
fi

# Go toolchain + the fixed reflect2 (the vendored v1.0.1 crashes under Go >= 1.18:
# modern-go/reflect2#26) + what kube's Makefile uses.
need=()
command -v go >/dev/null 2>&1 || need+=(golang-go)
[ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] || need+=(golang-github-modern-go-reflect2-dev)
command -v rsync >/dev/null 2>&1 || need+=(rsync)
command -v make >/dev/null 2>&1 || need+=(make)
if [ "${#need[@]}" -gt 0 ]; then apt_install "${need[@]}"; fi
apt_update   # make sure the deb-src indexes are there
log "go: $(go version)"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/dcgmrelay-kube-build.XXXXXX")"
cleanup_build() { rm -rf "$WORK"; }
trap cleanup_build EXIT
cd "$WORK"
log "apt-get source --download-only kubernetes (in $WORK)"
apt-get source --download-only kubernetes 2>&1 | tail -n 3
orig="$(find . -maxdepth 1 -name 'kubernetes_*.orig.tar.*' | head -n1)"
[ -n "$orig" ] || die "no kubernetes_*.orig.tar.* downloaded (see apt-get source output above)"
log "unpacking $orig"
mkdir src
tar xf "$orig" -C src
top="$(find src -mindepth 1 -maxdepth 1 -type d | head -n1)"
[ -d "$top/cmd/kube-apiserver" ] || die "$orig has no cmd/kube-apiserver"
cd "$top"
log "source: $(basename "$PWD"); swapping vendored reflect2 for Debian's $(dpkg-query -W -f='${Version}' golang-github-modern-go-reflect2-dev 2>/dev/null)"
rm -rf vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
# GOPATH layout, as debian/rules does (k8s 1.20 builds with GO111MODULE=off).
mkdir -p .go/src/k8s.io
ln -sfn ../../.. .go/src/k8s.io/kubernetes
log "make WHAT=cmd/kube-apiserver (quiet; progress every 30 s)"
gohome="$(mktemp -d "$WORK/home.XXXXXX")"
(
    env GOPATH="$PWD/.go" CGO_ENABLED=0 HOME="$gohome" GOFLAGS= \
        make WHAT=cmd/kube-apiserver > "$WORK/make.log" 2>&1
) &
mpid=$!
while kill -0 "$mpid" 2>/dev/null; do
    sleep 30
    kill -0 "$mpid" 2>/dev/null && log "  ... still building ($(( $(date +%s) - start )) s)"
done
if ! wait "$mpid"; then
    tail -n 40 "$WORK/make.log" >&2
    die "make WHAT=cmd/kube-apiserver failed (log above)"
fi
built="_output/bin/kube-apiserver"
[ -x "$built" ] || built="$(find _output -type f -name kube-apiserver -perm -u+x | head -n1)"
if [ -z "$built" ] || [ ! -x "$built" ]; then
    die "build finished but no kube-apiserver binary under _output"
fi
install -m 0755 "$built" "$BIN.tmp"
mv -f "$BIN.tmp" "$BIN"
binary_ok "$BIN" || die "$BIN does not run"
log "kube-apiserver: built $BIN ($("$BIN" --version 2>&1)) in $(( $(date +%s) - start )) s"
