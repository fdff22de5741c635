#!/usr/bin/env bash
# The whole job in one go: a paced producer pipes examples/tokens.txt into
# `sserelay serve`, a client watches the events arrive live, the bill follows.
set -euo pipefail
cd "$(dirname "$0")/.."
sserelay=${SSERELAY:-.venv/bin/sserelay}
[ -x "$sserelay" ] || sserelay=sserelay
trap 'kill "${relay:-}" 2>/dev/null || true' EXIT
# A free port chosen here, so sserelay's stderr stays this terminal: its live counter (tokens,
# events, tokens/s, clients, cost) shows as the stream goes, above the events curl prints.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port/"

# One line every 0.15 s, like a model producing text.
while IFS= read -r line; do printf '%s\n' "$line"; sleep 0.15; done < examples/tokens.txt |
  "$sserelay" serve --port "$port" &
relay=$!

for _ in $(seq 100); do
  python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "healthz")' \
    "$url" 2>/dev/null && break
  sleep 0.1
done

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
