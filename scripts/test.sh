#!/usr/bin/env bash
# Installs what the test suite needs and runs all of it: bash scripts/test.sh [pytest args]
# Works on a fresh Debian/Ubuntu machine with Python 3.11 (as root, or with sudo for apt).
set -euo pipefail
cd "$(dirname "$0")/.."
apt_packages=()
# promtool checks our /metrics and rules; the prometheus server scrapes a daemon in a test
command -v promtool >/dev/null || apt_packages+=(prometheus)
# the Redis-backed rate limits and notifications run a throwaway redis-server
command -v redis-server >/dev/null || apt_packages+=(redis-server)
# the systemd unit boots for real in a container (as root); the shell scripts are linted
command -v systemd-nspawn >/dev/null || apt_packages+=(systemd-container)
command -v shellcheck >/dev/null || apt_packages+=(shellcheck)
# optimizerctl top's live mode is driven in tmux; the web console in headless Chromium
command -v tmux >/dev/null || apt_packages+=(tmux)
command -v chromium >/dev/null || apt_packages+=(chromium)
# The PostgreSQL storage tests run throwaway servers with initdb/pg_ctl.
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || apt_packages+=(postgresql)
pip_extras="[test]"
# shellcheck source=scripts/bootstrap.sh
source scripts/bootstrap.sh
exec python -m pytest "$@"
