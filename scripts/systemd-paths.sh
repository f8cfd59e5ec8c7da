# Sourced by install-systemd.sh and uninstall-systemd.sh: where the systemd deployment lives,
# and their two message helpers.
# shellcheck shell=bash disable=SC2034
NAME=llm-optimizer
VENV=/opt/llm-optimizer
BINDIR=/usr/local/bin
CONFDIR=/etc/llm-optimizer
STATEDIR=/var/lib/llm-optimizer
UNITDIR=/etc/systemd/system
UNIT=optimizerd.service

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 1
}

say() {
  echo "  $*"
}
