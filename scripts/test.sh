#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs every check: formatting and lints (rustfmt,
# clippy, ruff, mypy), Rust unit and privileged integration tests, Python unit tests, and
# end-to-end tests against a live flared.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="$("${FLARE_PYTHON:-python3}" -c 'import sys; print(sys.executable)')"

status=0
echo "== cargo fmt --check"
cargo fmt --all -- --check || status=1
echo "== cargo clippy --release --workspace --all-targets -- -D warnings"
cargo clippy --release --workspace --all-targets --keep-going -- -D warnings || status=1
echo "== ruff check python; mypy python/flare"
"$PY" -m ruff check python/flare python/modal-compat || status=1
"$PY" -m mypy --config-file python/pyproject.toml python/flare || status=1

echo "== cargo test --release --workspace --no-fail-fast"
cargo test --release --workspace --no-fail-fast -- --test-threads=2 || status=1

echo "== pytest python/tests python/modal-compat/tests tests/e2e"
"$PY" -m pytest -q -p no:cacheprovider python/tests python/modal-compat/tests tests/e2e || status=1
exit $status
