#!/usr/bin/env bash
# Installs what the test suite needs and runs all of it: bash scripts/test.sh [pytest args]
# Works on a fresh Debian/Ubuntu machine with Python 3.11 (as root, or with sudo for apt).
set -euo pipefail
cd "$(dirname "$0")/.."
apt_packages=()
command -v promtool >/dev/null || apt_packages+=(prometheus)  # promtool checks our /metrics
# The PostgreSQL storage tests run throwaway servers with initdb/pg_ctl.
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || apt_packages+=(postgresql)
pip_extras="[test]"
# shellcheck source=scripts/bootstrap.sh
source scripts/bootstrap.sh
exec python -m pytest "$@"
