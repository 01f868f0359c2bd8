#!/usr/bin/env bash
# Installs everything Flare needs on a fresh Debian/Ubuntu machine (as root) and builds it:
# system packages (iproute2, iptables for container NAT), the flared binary (cargo, release),
# and the Python SDK + CLI (pip, editable) with the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "Error: Flare's embedded server runs containers and must be set up as root." >&2
  exit 1
fi

need=()
for pkg in iproute2 iptables protobuf-compiler docker-registry debootstrap e2fsprogs chromium; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  log "apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "Error: cargo not found; install a Rust toolchain (rustup) first." >&2
  exit 1
fi
# CRIU >= 4 (memory snapshots; Debian 12's 3.17 fails `criu check` on recent kernels):
# built once from Debian's source package, a fast no-op afterwards.
bash scripts/install-criu.sh

# The checks in scripts/test.sh use rustfmt and clippy.
if command -v rustup >/dev/null 2>&1; then
  for comp in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$comp" || { log "rustup component add $comp"; rustup component add "$comp"; }
  done
fi
log "cargo build --release -p flared"
cargo build --release -p flared

PY="${FLARE_PYTHON:-$(command -v python3)}"
# Resolve version-manager shims to the real interpreter (faster start, stable sys.executable).
PY="$("$PY" -c 'import sys; print(sys.executable)')"
log "pip install -e python (using $PY)"
# compat mode: a plain .pth entry instead of an import finder that costs ~10 ms per interpreter start (containers included)
"$PY" -m pip install -q --disable-pip-version-check --config-settings editable_mode=compat -e 'python[test]'

# Put the CLI on PATH even when the interpreter's bin dir is not (pyenv and friends).
bindir="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
if ! command -v flare >/dev/null 2>&1 || [ "$(command -v flare)" != "$bindir/flare" ]; then
  ln -sf "$bindir/flare" /usr/local/bin/flare
fi
ln -sf "$PWD/target/release/flared" /usr/local/bin/flared
log "ready: $(flare --version)"
