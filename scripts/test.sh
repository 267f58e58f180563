#!/usr/bin/env bash
# Runs every test: unit, store conformance and model-based tests (memory, sled, Redis), and the
# real-binary integration tests. Some tests need real parts, never mocks:
# - the Redis tests start their own redis-server on 127.0.0.1 (Debian's redis-server);
# - the key-affinity test runs Debian's nginx in front of two proxies;
# - the Prometheus test runs Debian's prometheus and promtool, and renders the dashboard with matplotlib;
# - the systemd unit is rated by systemd-analyze (Debian's systemd);
# - the full-disk tests mount a small tmpfs (root);
# - the power-loss test runs the data dir on a FUSE file system that drops unsynced writes
#   (tests/support/lazyfs.py: python3 with fusepy, libfuse2, fuse3, /dev/fuse);
# - the OTLP test receives the proxy's spans on a real OTLP/HTTP receiver of its own;
# - then scripts/container.sh builds the image from the Dockerfile and runs it with podman, and
#   scripts/deb.sh builds the .deb and installs it in a Debian container (both as root: they install
#   podman, runc and debootstrap, and cargo-deb).
# As root on Debian this installs what is missing; otherwise it says what to install.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
command -v fusermount >/dev/null 2>&1 || command -v fusermount3 >/dev/null 2>&1 || need_apt+=(fuse3)
ldconfig -p 2>/dev/null | grep -q 'libfuse.so.2' || need_apt+=(libfuse2)
if [ "${#need_apt[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing ${need_apt[*]} (Debian packages)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "test.sh: please install ${need_apt[*]} (e.g. sudo apt-get install ${need_apt[*]})" >&2
    exit 1
  fi
fi
if ! python3 -c 'import fuse' >/dev/null 2>&1; then
  echo "test.sh: installing fusepy (PyPI) for the power-loss test" >&2
  python3 -m pip install -q fusepy
fi
if ! python3 -c 'import matplotlib' >/dev/null 2>&1; then
  echo "test.sh: installing matplotlib (PyPI) to render the dashboard" >&2
  python3 -m pip install -q matplotlib || echo "test.sh: matplotlib not installed; the dashboard PNG is not rendered" >&2
fi

cargo test "$@"

# The image and the package, built and run for real (podman; root). With arguments (a test filter)
# only those cargo tests run.
[ "$#" -eq 0 ] || exit 0
if [ "$(id -u)" = 0 ]; then
  scripts/container.sh
  scripts/deb.sh
else
  echo "test.sh: the container image and Debian package checks need root (podman):" >&2
  echo "  sudo scripts/container.sh && sudo scripts/deb.sh" >&2
fi
