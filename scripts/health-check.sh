#!/usr/bin/env bash
# Is optimizerd taking traffic? For load balancers, cron and monitoring scripts.
#   scripts/health-check.sh [--url URL] [--live] [--timeout SECONDS] [--quiet]
# Asks the admin endpoint's /ready (every enabled service READY), or /health with --live (the
# daemon answers at all). Prints one line; exit 0 ready (or alive), 1 not, 2 bad usage.
set -euo pipefail

base="http://127.0.0.1:9090"
path="/ready"
timeout=3
quiet=0

usage() {
  sed -n '2,5s/^# \{0,1\}//p' "$0"
}

while (($#)); do
  case "$1" in
    --url) base="${2:?--url needs a value}"; shift 2 ;;
    --live) path="/health"; shift ;;
    --timeout) timeout="${2:?--timeout needs a value}"; shift 2 ;;
    --quiet) quiet=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "health-check: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ "$timeout" =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "health-check: --timeout takes seconds" >&2; exit 2; }

url="${base%/}${path}"
if command -v curl >/dev/null; then
  body=$(curl --silent --show-error --max-time "$timeout" --write-out '\n%{http_code}' "$url" 2>&1) || true
else
  body=$(python3 - "$url" "$timeout" <<'EOF'
import sys, urllib.error, urllib.request
url, timeout = sys.argv[1], float(sys.argv[2])
try:
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        print(answer.read().decode(errors="replace")); print(answer.status)
except urllib.error.HTTPError as exc:
    print(exc.read().decode(errors="replace")); print(exc.code)
except OSError as exc:
    print(exc); print(0)
EOF
)
fi
status="${body##*$'\n'}"
text="${body%$'\n'*}"
if [[ "$status" == "200" ]]; then
  ((quiet)) || echo "optimizerd ${path#/}: ok ($url)"
  exit 0
fi
((quiet)) || echo "optimizerd ${path#/}: NOT ok ($url, status ${status:-none}): ${text//$'\n'/ }"
exit 1
