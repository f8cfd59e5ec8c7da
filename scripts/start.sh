#!/usr/bin/env bash
# Installs optimizerd into ./.venv and runs it in the foreground: bash scripts/start.sh [args]
# With no arguments it runs `optimizerd start` on the built-in defaults (embedded storage,
# everything on 127.0.0.1). Stop it with Ctrl-C or `.venv/bin/optimizerctl stop`.
set -euo pipefail
cd "$(dirname "$0")/.."
apt_packages=()
# shellcheck source=scripts/bootstrap.sh
source scripts/bootstrap.sh
if [ $# -eq 0 ]; then set -- start; fi
exec optimizerd "$@"
