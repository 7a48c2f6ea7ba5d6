#!/usr/bin/env bash
# Installs what the benchmark needs from Debian when it is missing: nginx with its njs module (the fake upstream
# chooses JSON or SSE by the request body's "stream" field in njs), wrk (the load generator) and redis-server (the
# gateway's private store). Never leaves a
# system nginx running: while apt-get runs, a policy-rc.d that answers 101 ("action forbidden") keeps Debian's
# postinst from starting the service on port 80 (an existing policy-rc.d is left as it is).
set -euo pipefail

missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_http_js_module.so ] || missing+=(libnginx-mod-http-js)
command -v wrk >/dev/null 2>&1 || [ -x /usr/bin/wrk ] || missing+=(wrk)
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || missing+=(redis-server)
command -v taskset >/dev/null 2>&1 || [ -x /usr/bin/taskset ] || missing+=(util-linux)
[ "${#missing[@]}" -eq 0 ] && exit 0

echo "installing ${missing[*]} (Debian packages)..."
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
POLICY=/usr/sbin/policy-rc.d
ours=0
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod 755 "$POLICY"
  ours=1
fi
cleanup() { if [ "$ours" -eq 1 ]; then $SUDO rm -f "$POLICY"; fi; }
trap cleanup EXIT
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq -o DPkg::Lock::Timeout=300 \
  "${missing[@]}" >/dev/null
