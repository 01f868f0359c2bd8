#!/usr/bin/env bash
# Installs CRIU >= 4 as /usr/local/sbin/criu (ahead of /usr/sbin in PATH), for Flare's
# memory snapshots (crates/flare-snapshot). Run as root. Idempotent: a no-op (well under a
# second) when the criu found in PATH is >= 4 and `criu check` passes.
#
# Debian 12's criu (3.17) fails `criu check` on recent kernels (its vDSO parser rejects the
# kernel's vDSO layout), so this builds CRIU from the source package of a newer Debian
# suite (trixie by default), through apt:
#   1. a deb-src entry for that suite in its own sources file, using the mirror this host's
#      apt already uses (source only: no binary package of the newer suite can be installed,
#      so no system library is ever upgraded to it);
#   2. `apt-get source --download-only criu` (apt checks the files against the signed
#      index; the upstream tarball is all the build needs);
#   3. the build dependencies as this release's own -dev packages (not `apt-get build-dep`,
#      which would ask for the newer suite's versions, and skipping the docs' toolchain);
#   4. `make criu` (the binary only), installed to /usr/local/sbin/criu;
#   5. `criu check`, and a report of the optional features Flare may use.
#
# Environment: CRIU_SUITE (default trixie), CRIU_PREFIX (default /usr/local), CRIU_KEEP_BUILD=1
# keeps the build directory, CRIU_FORCE=1 rebuilds even when a good criu is installed.
set -euo pipefail

SUITE="${CRIU_SUITE:-trixie}"
PREFIX="${CRIU_PREFIX:-/usr/local}"
DEST="$PREFIX/sbin/criu"
SRC_LIST=/etc/apt/sources.list.d/flare-criu-src.sources
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

log() { printf '\033[1m== install-criu: %s\033[0m\n' "$*" >&2; }
die() { printf 'install-criu: error: %s\n' "$*" >&2; exit 1; }

# The major version of the criu at $1 (0 when it does not run).
criu_major() {
  local v
  v="$("$1" --version 2>/dev/null | awk '/^Version:/ {print $2; exit}')" || true
  echo "${v%%.*}" | grep -E '^[0-9]+$' || echo 0
}

# Is the criu at $1 >= 4 with a passing `criu check`?
good_criu() {
  [ -x "$1" ] || return 1
  [ "$(criu_major "$1")" -ge 4 ] || return 1
  "$1" check >/dev/null 2>&1
}

report_features() {
  local bin="$1" f
  for f in userns uffd uffd-noncoop seccomp_suspend cgroupns timens pidfd_store clone3_set_tid \
    overlayfs_maps move_mount_set_group mem_dirty_track; do
    if "$bin" check --feature "$f" >/dev/null 2>&1; then
      log "feature $f: yes"
    else
      log "feature $f: no"
    fi
  done
}

if [ -z "${CRIU_FORCE:-}" ]; then
  for cand in "$DEST" "$(command -v criu 2>/dev/null || true)"; do
    if [ -n "$cand" ] && good_criu "$cand"; then
      log "$("$cand" --version | awk '/^Version:/ {print $2}') at $cand passes criu check: nothing to do"
      exit 0
    fi
  done
fi

[ "$(id -u)" = 0 ] || die "must run as root (apt, and criu itself needs root)"
command -v apt-get >/dev/null || die "apt-get not found: this script builds CRIU from Debian's source package"
[ -r "$KEYRING" ] || die "$KEYRING missing (apt-get install debian-archive-keyring)"
export DEBIAN_FRONTEND=noninteractive
start=$(date +%s)

# The mirror this host's apt already uses for Debian itself.
mirror="$(
  {
    grep -hE '^[[:space:]]*URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}'
    grep -hE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
      sed -E 's/\[[^]]*\]//' | awk '{print $2}'
  } | grep -E '/debian/?$' | head -n1 || true
)"
[ -n "$mirror" ] || die "no Debian mirror found in apt's sources to take the $SUITE source package from"

log "deb-src $SUITE from the host's Debian mirror ($SRC_LIST)"
cat >"$SRC_LIST" <<EOF
# Written by Flare's scripts/install-criu.sh: the source of CRIU, built locally.
# deb-src only: no binary package of this suite is installable from it.
Types: deb-src
URIs: $mirror
Suites: $SUITE
Components: main
Signed-By: $KEYRING
EOF
apt-get update -qq

version="$(apt-cache showsrc criu 2>/dev/null | awk '/^Version:/ {print $2}' | sort -V | tail -n1)"
[ -n "$version" ] || die "apt knows no criu source package (is $SUITE's deb-src reachable?)"
upstream="${version#*:}"
upstream="${upstream%-*}"
[ "${upstream%%.*}" -ge 4 ] 2>/dev/null || die "the newest criu source apt offers is $version (< 4)"

log "build dependencies (from this release's own packages)"
apt-get install -y -qq --no-install-recommends \
  build-essential pkg-config python3 python3-protobuf \
  libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev protobuf-compiler \
  libnl-3-dev libnet1-dev libcap-dev libbsd-dev libgnutls28-dev libaio-dev \
  uuid-dev libnftables-dev >/dev/null

work="$(mktemp -d /tmp/flare-criu-build.XXXXXX)"
if [ -z "${CRIU_KEEP_BUILD:-}" ]; then
  trap 'rm -rf "$work"' EXIT
fi
cd "$work"
log "apt-get source criu=$version (in $work)"
# The .dsc and the Debian diff may be missing from a mirror that has the upstream
# tarball; apt verifies every file it fetches against the signed Sources index, and the
# upstream tarball is all that the binary needs (Debian's changes are packaging).
apt-get source -qq --download-only "criu=$version" >apt-source.log 2>&1 || true
orig="$(ls criu_"$upstream".orig.tar.* 2>/dev/null | head -n1 || true)"
if [ -z "$orig" ]; then
  cat apt-source.log >&2
  die "apt could not fetch criu $version's source (no other source is reachable from here)"
fi
want="$(apt-cache showsrc criu | awk -v v="$version" -v f="$orig" \
  '/^Package:/ {in_v = 0} /^Version:/ {in_v = ($2 == v)} in_v && $3 == f && length($1) == 64 {print $1; exit}')"
have="$(sha256sum "$orig" | awk '{print $1}')"
[ -z "$want" ] || [ "$want" = "$have" ] || die "$orig: sha256 $have, the index says $want"
tar xf "$orig"
cd "criu-$upstream"

log "make criu ($(nproc) jobs)"
build_start=$(date +%s)
if ! make -j"$(nproc)" criu >"$work/build.log" 2>&1; then
  tail -n 40 "$work/build.log" >&2
  die "build failed (log: $work/build.log; CRIU_KEEP_BUILD=1 keeps it)"
fi
log "built in $(($(date +%s) - build_start)) s"
install -D -m 0755 criu/criu "$DEST"

if ! out="$("$DEST" check 2>&1)"; then
  printf '%s\n' "$out" | tail -n 10 >&2
  die "$DEST was installed but \`criu check\` fails on kernel $(uname -r)"
fi
log "$("$DEST" --version | awk '/^Version:/ {print $2}') at $DEST: criu check passes"
report_features "$DEST"
log "done in $(($(date +%s) - start)) s"
