# Sourced by start.sh and test.sh: apt packages named in $apt_packages plus python3-venv when
# missing, then a .venv with this project installed (extras in $pip_extras), first on PATH.
# shellcheck shell=bash
python3 -c 'import ensurepip, venv' 2>/dev/null || apt_packages+=(python3-venv)
if ((${#apt_packages[@]})); then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing ${apt_packages[*]} with apt" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "${apt_packages[@]}" >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${pip_extras:-}"
export PATH="$PWD/.venv/bin:$PATH"
