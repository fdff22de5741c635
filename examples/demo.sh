#!/usr/bin/env bash
# The whole job in one go: a paced producer pipes examples/tokens.txt into
# `sserelay serve`, a client watches the events arrive live, the bill follows.
set -euo pipefail
cd "$(dirname "$0")/.."
sserelay=${SSERELAY:-.venv/bin/sserelay}
[ -x "$sserelay" ] || sserelay=sserelay
log=$(mktemp)
trap 'rm -f "$log"; kill "$relay" 2>/dev/null || true' EXIT

# One line every 0.15 s, like a model producing text.
while IFS= read -r line; do printf '%s\n' "$line"; sleep 0.15; done < examples/tokens.txt |
  "$sserelay" serve --port 0 2> >(tee "$log" >&2) &
relay=$!

url=""
for _ in $(seq 100); do
  url=$(grep -o 'http://[^ ]*/' "$log" || true)
  [ -n "$url" ] && break
  sleep 0.1
done
[ -n "$url" ] || { echo "demo: sserelay did not start" >&2; exit 1; }

echo "demo: reading $url" >&2
if command -v curl >/dev/null; then
  curl -sN "$url"
else
  python3 - "$url" <<'PY'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1]) as response:
    for line in response:
        sys.stdout.write(line.decode()); sys.stdout.flush()
PY
fi
wait "$relay"
