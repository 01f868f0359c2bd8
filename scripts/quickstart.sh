#!/usr/bin/env bash
# Sets everything up, then runs the hello-world example on the embedded server
# (which `flare run` starts in the background when none is running).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
flare run examples/hello_world.py --n "${N:-500}"
