#!/usr/bin/env bash
# Installs optimizerd as a systemd service; safe to run again (an upgrade). Run as root.
# See --help, and scripts/uninstall-systemd.sh for the way back.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: install-systemd.sh [--wheel PATH] [--python PATH] [--no-start] [--help]

Installs optimizerd as the systemd service optimizerd.service (run as root; running it again
upgrades the package and keeps every edited file):

  user and group     llm-optimizer (system, no home, no login shell)
  package            a venv in /opt/llm-optimizer with this checkout (`pip install .`), or --wheel
  commands           /usr/local/bin/optimizerd and optimizerctl (symlinks into the venv)
  config             /etc/llm-optimizer/optimizer.toml, from etc/optimizer.toml if absent (an
                     existing file is never overwritten), root:llm-optimizer 0640
  secrets            /etc/llm-optimizer/optimizer.env, a commented template if absent, root 0600
  state              /var/lib/llm-optimizer, llm-optimizer 0700
  unit               /etc/systemd/system/optimizerd.service (local changes belong in drop-ins:
                     systemctl edit optimizerd), then daemon-reload and enable --now (a running
                     daemon is restarted onto the new version)

options:
  --wheel PATH   install this wheel instead of the checkout the script lives in
  --python PATH  the interpreter for the venv (3.11+); default /usr/bin/python3, else python3.
                 It must not live under /home, /root or /run/user: the unit's ProtectHome=yes
                 hides them from the daemon.
  --no-start     neither enable nor start the service (daemon-reload still runs when systemd
                 is running)
  -h, --help     this text

pip's own environment applies, e.g. PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR for an offline install.
EOF
}

# shellcheck source=scripts/systemd-paths.sh
source "$(dirname "$0")/systemd-paths.sh"

wheel=""
python=""
start=1
while (($#)); do
  case "$1" in
    --wheel)
      (($# >= 2)) || die "--wheel needs a path"
      wheel="$2"
      shift 2
      ;;
    --wheel=*)
      wheel="${1#--wheel=}"
      shift
      ;;
    --python)
      (($# >= 2)) || die "--python needs a path"
      python="$2"
      shift 2
      ;;
    --python=*)
      python="${1#--python=}"
      shift
      ;;
    --no-start)
      start=0
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

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ "$(id -u)" = 0 ] || die "run as root (it creates a system user and writes /etc, /opt, /var/lib)"
for f in etc/optimizer.toml "etc/systemd/$UNIT"; do
  [ -f "$repo/$f" ] || die "$repo/$f is missing: run the script from a checkout of the project"
done
if [ -n "$wheel" ]; then
  [ -f "$wheel" ] || die "no such wheel: $wheel"
  wheel="$(cd "$(dirname "$wheel")" && pwd)/$(basename "$wheel")"
else
  [ -f "$repo/pyproject.toml" ] || die "$repo/pyproject.toml is missing (or use --wheel PATH)"
fi

systemd_running=0
[ -d /run/systemd/system ] && systemd_running=1
if ((start && !systemd_running)); then
  die "systemd is not running here (no /run/systemd/system): use --no-start to install only"
fi

# The interpreter: the unit runs with ProtectHome=yes, so a venv whose python lives under a
# home directory (pyenv, a user's build) would not start.
if [ -z "$python" ]; then
  if [ -x /usr/bin/python3 ]; then
    python=/usr/bin/python3
  else
    python="$(command -v python3)" || die "no python3 found: install it or pass --python PATH"
  fi
fi
[ -x "$python" ] || python="$(command -v "$python")" || die "no such interpreter: $python"
real_python="$("$python" -c 'import os, sys; print(os.path.realpath(sys.executable))')" \
  || die "$python does not run"
case "$real_python" in
  /home/* | /root/* | /run/user/*)
    die "$python is $real_python, which the unit's ProtectHome=yes hides from the daemon:" \
      "pass --python with an interpreter outside /home, /root and /run/user (e.g. /usr/bin/python3)"
    ;;
esac
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$python is $("$python" -V 2>&1); optimizerd needs Python 3.11 or newer"
"$python" -c 'import ensurepip, venv' 2>/dev/null \
  || die "$python cannot create a venv: install python3-venv (apt-get install python3-venv)"

# Everything installed here is read by the llm-optimizer user: not root's umask.
umask 022
echo "installing optimizerd (systemd) from $repo"

# 1. User and group.
if getent group "$NAME" >/dev/null; then
  say "group $NAME: exists"
else
  groupadd --system "$NAME"
  say "group $NAME: created"
fi
if getent passwd "$NAME" >/dev/null; then
  say "user $NAME: exists"
else
  nologin="$(command -v nologin || echo /usr/sbin/nologin)"
  useradd --system --gid "$NAME" --no-create-home --home-dir /nonexistent \
    --shell "$nologin" --comment "LLM Auto Optimizer" "$NAME"
  say "user $NAME: created (system, no home, shell $nologin)"
fi

# 2. The venv and the package.
if [ -x "$VENV/bin/python" ] && [ -f "$VENV/pyvenv.cfg" ]; then
  say "venv $VENV: exists ($("$VENV/bin/python" -V 2>&1))"
else
  [ ! -e "$VENV" ] || die "$VENV exists but is not a venv: move it away first"
  "$python" -m venv "$VENV"
  say "venv $VENV: created with $real_python"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
if [ -n "$wheel" ]; then
  # --force-reinstall --no-deps first: the same version number must still replace the code.
  "$VENV/bin/python" -m pip install --quiet "$wheel"
  "$VENV/bin/python" -m pip install --quiet --force-reinstall --no-deps "$wheel"
  say "package: $(basename "$wheel")"
else
  "$VENV/bin/python" -m pip install --quiet "$repo"
  "$VENV/bin/python" -m pip install --quiet --force-reinstall --no-deps "$repo"
  say "package: $repo"
fi
for cmd in optimizerd optimizerctl; do
  [ -x "$VENV/bin/$cmd" ] || die "$VENV/bin/$cmd is missing after the install"
done
"$VENV/bin/optimizerd" print-default-config >/dev/null || die "$VENV/bin/optimizerd does not run"

# 3. The commands on the unit's paths.
for cmd in optimizerd optimizerctl; do
  link="$BINDIR/$cmd"
  if [ -e "$link" ] && [ ! -L "$link" ]; then
    die "$link exists and is not a symlink (another installation?): remove it and run again"
  fi
  ln -sfn "$VENV/bin/$cmd" "$link"
  say "$link -> $VENV/bin/$cmd"
done

# 4. Config and secrets.
install -d -m 0755 -o root -g root "$CONFDIR"
if [ -e "$CONFDIR/optimizer.toml" ]; then
  if cmp -s "$repo/etc/optimizer.toml" "$CONFDIR/optimizer.toml"; then
    say "$CONFDIR/optimizer.toml: exists (the shipped defaults)"
  else
    say "$CONFDIR/optimizer.toml: exists, edited: kept (the shipped one is $repo/etc/optimizer.toml)"
  fi
else
  install -m 0640 -o root -g "$NAME" "$repo/etc/optimizer.toml" "$CONFDIR/optimizer.toml"
  say "$CONFDIR/optimizer.toml: installed from etc/optimizer.toml"
fi
if ! "$VENV/bin/optimizerd" check-config -c "$CONFDIR/optimizer.toml" >/dev/null; then
  die "$CONFDIR/optimizer.toml is invalid: $VENV/bin/optimizerd check-config -c" \
    "$CONFDIR/optimizer.toml names the fault"
fi
if [ -e "$CONFDIR/optimizer.env" ]; then
  say "$CONFDIR/optimizer.env: exists, kept"
else
  (
    umask 077
    cat >"$CONFDIR/optimizer.env" <<'EOF'
# Environment of optimizerd.service, read by systemd as root (EnvironmentFile=): keep it 0600.
# Secrets belong here (or in files named by the *_file keys), never in optimizer.toml.
# One VARIABLE=value a line; any config key as LLM_OPTIMIZER__SECTION__KEY=value.
# After a change: systemctl restart optimizerd
#
# LLM_OPTIMIZER__STORAGE__POSTGRES_DSN=postgresql://optimizer:PASSWORD@db.example:5432/optimizer
# LLM_OPTIMIZER__STORAGE__REDIS_URL=redis://:PASSWORD@redis.example:6379/0
# LLM_OPTIMIZER__REST_API__JWT__SECRET_FILE=/etc/llm-optimizer/jwt.secret
# LLM_OPTIMIZER__INTEGRATIONS__SLACK__WEBHOOK_URL=https://hooks.slack.com/services/...
# LLM_OPTIMIZER__INTEGRATIONS__JIRA__API_TOKEN=...
# LLM_OPTIMIZER__INTEGRATIONS__GITHUB__TOKEN=...
# LLM_OPTIMIZER__INTEGRATIONS__ANTHROPIC__API_KEY=...
EOF
  )
  say "$CONFDIR/optimizer.env: template written (root 0600, every line commented)"
fi
chown root:root "$CONFDIR/optimizer.env"
chmod 0600 "$CONFDIR/optimizer.env"

# 5. State.
install -d -m 0700 -o "$NAME" -g "$NAME" "$STATEDIR"
chown "$NAME:$NAME" "$STATEDIR"
chmod 0700 "$STATEDIR"
say "$STATEDIR: $NAME 0700"

# 6. The unit.
if cmp -s "$repo/etc/systemd/$UNIT" "$UNITDIR/$UNIT"; then
  say "$UNITDIR/$UNIT: up to date"
else
  install -m 0644 -o root -g root "$repo/etc/systemd/$UNIT" "$UNITDIR/$UNIT"
  say "$UNITDIR/$UNIT: installed"
fi
if ((!systemd_running)); then
  say "systemd is not running: no daemon-reload; then: systemctl enable --now $UNIT"
  echo "done"
  exit 0
fi
systemctl daemon-reload
say "systemctl daemon-reload"
if ((!start)); then
  say "--no-start: not enabled, not started; then: systemctl enable --now $UNIT"
  echo "done"
  exit 0
fi
systemctl enable --quiet "$UNIT"
say "systemctl enable $UNIT"
if systemctl is-active --quiet "$UNIT"; then
  action=restart
else
  action=start
fi
if ! systemctl "$action" "$UNIT"; then
  die "systemctl $action $UNIT failed: see systemctl status $UNIT and journalctl -u $UNIT"
fi
say "systemctl $action $UNIT: $(systemctl show -p ActiveState --value "$UNIT")" \
  "($(systemctl show -p StatusText --value "$UNIT"))"
echo "done"
