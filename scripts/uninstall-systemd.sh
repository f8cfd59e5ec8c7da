#!/usr/bin/env bash
# Removes what scripts/install-systemd.sh installed; config and state stay unless --purge.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: uninstall-systemd.sh [--purge] [--help]

Removes optimizerd.service as scripts/install-systemd.sh installed it (run as root): stops and
disables the service, removes /etc/systemd/system/optimizerd.service, the symlinks
/usr/local/bin/optimizerd and optimizerctl and the venv /opt/llm-optimizer.

Kept unless --purge: /etc/llm-optimizer (config, secrets), /var/lib/llm-optimizer (the data),
drop-ins in /etc/systemd/system/optimizerd.service.d and the user and group llm-optimizer.

options:
  --purge      also delete those: every piece of configuration and all data
  -h, --help   this text
EOF
}

# shellcheck source=scripts/systemd-paths.sh
source "$(dirname "$0")/systemd-paths.sh"

purge=0
while (($#)); do
  case "$1" in
    --purge)
      purge=1
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      usage >&2
      die "unknown argument: $1"
      ;;
  esac
done
[ "$(id -u)" = 0 ] || die "run as root"

echo "uninstalling optimizerd (systemd)"
systemd_running=0
[ -d /run/systemd/system ] && systemd_running=1
if ((systemd_running)) && [ -n "$(systemctl list-unit-files --no-legend "$UNIT" 2>/dev/null)" ]; then
  # stop waits for optimizerd to stop its services in order (TimeoutStopSec).
  systemctl disable --now --quiet "$UNIT" || die "systemctl disable --now $UNIT failed"
  say "systemctl disable --now $UNIT"
elif ((!systemd_running)); then
  say "systemd is not running: nothing to stop"
fi

if [ -e "$UNITDIR/$UNIT" ]; then
  rm -f "$UNITDIR/$UNIT"
  say "removed $UNITDIR/$UNIT"
fi
if ((purge)) && [ -d "$UNITDIR/$UNIT.d" ]; then
  rm -rf "$UNITDIR/$UNIT.d"
  say "removed $UNITDIR/$UNIT.d"
fi
if ((systemd_running)); then
  systemctl daemon-reload
  systemctl reset-failed "$UNIT" 2>/dev/null || true
  say "systemctl daemon-reload"
fi

for cmd in optimizerd optimizerctl; do
  link="$BINDIR/$cmd"
  if [ -L "$link" ]; then
    case "$(readlink "$link")" in
      "$VENV"/*)
        rm -f "$link"
        say "removed $link"
        ;;
      *) say "kept $link: it points elsewhere ($(readlink "$link"))" ;;
    esac
  elif [ -e "$link" ]; then
    say "kept $link: not a symlink of this installation"
  fi
done

if [ -e "$VENV" ]; then
  [ -f "$VENV/pyvenv.cfg" ] || die "$VENV is not a venv: not removing it"
  rm -rf "$VENV"
  say "removed $VENV"
fi

if ((!purge)); then
  for d in "$CONFDIR" "$STATEDIR"; do
    [ ! -e "$d" ] || say "kept $d (--purge deletes it)"
  done
  echo "done"
  exit 0
fi
for d in "$CONFDIR" "$STATEDIR"; do
  if [ -e "$d" ]; then
    rm -rf "$d"
    say "removed $d"
  fi
done
if getent passwd "$NAME" >/dev/null; then
  userdel "$NAME"
  say "removed user $NAME"
fi
if getent group "$NAME" >/dev/null; then
  groupdel "$NAME"
  say "removed group $NAME"
fi
echo "done"
