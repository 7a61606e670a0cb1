#!/usr/bin/env bash
# wrk, as proxy-compare runs it, except in the cookie variant: the harness sends `Cookie: SRV=s2`
# (the nginx and HAProxy sticky cookie), which switchyard rightly treats as no cookie of its own, so
# it would measure a Set-Cookie on every response. When the target answers with a switchyard cookie,
# that cookie is added to the header: nginx and HAProxy still see SRV=s2, switchyard sees a valid
# `sy` cookie, and every contender gets the same header bytes but for the extra cookie.
set -euo pipefail
args=("$@")
url="${args[-1]}"
for i in "${!args[@]}"; do
  if [[ "${args[$i]}" == "Cookie: SRV=s2" ]]; then
    pinned=$(curl -s -o /dev/null -D - "$url" | tr -d '\r' | sed -n 's/^[Ss]et-[Cc]ookie: \(sy=[^;]*\).*/\1/p' | head -1)
    if [[ -n "$pinned" ]]; then
      args[i]="Cookie: SRV=s2; $pinned"
    fi
  fi
done
exec wrk "${args[@]}"
