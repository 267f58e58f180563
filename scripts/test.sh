#!/usr/bin/env bash
# Runs every test: unit, store conformance and model-based tests (memory, sled, Redis), and the
# real-binary integration tests. The Redis tests start their own redis-server on 127.0.0.1 and fail
# (never skip) without one, so this installs Debian's redis-server first when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing redis-server (Debian package)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "test.sh: redis-server is required (e.g. sudo apt-get install redis-server)" >&2
    exit 1
  fi
fi

exec cargo test "$@"
