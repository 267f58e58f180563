# Shared by scripts/container.sh and scripts/deb.sh: podman, and base images made locally from Debian
# packages (no image registry is needed). Everything built here is cached between runs on one machine:
# the debootstrap tree under $IDEMPROXY_CI_CACHE, the images in podman's store by name.

export CONTAINERS_CONF="$REPO/scripts/container/containers.conf"
CACHE=${IDEMPROXY_CI_CACHE:-/var/cache/idemproxy-ci}
SUITE=bookworm
DEBIAN_IMAGE=localhost/idemproxy-ci/debian:$SUITE

say() { printf '== %s: %s\n' "$TOOL" "$*" >&2; }
fail() {
  printf '%s: FAILED: %s\n' "$TOOL" "$*" >&2
  exit 1
}

# podman, runc and debootstrap from Debian's packages (as root), or a message saying what to install.
ensure_podman() {
  local need=()
  command -v podman >/dev/null 2>&1 || need+=(podman)
  command -v runc >/dev/null 2>&1 || need+=(runc)
  command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
  if [ "${#need[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      say "installing ${need[*]} (Debian packages)"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
      fail "please install ${need[*]} (root is needed to run podman here)"
    fi
  fi
}

# A port nothing listens on, from the kernel.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Polls (bounded: LIMIT seconds) until `CMD...` succeeds; 1 with a message if it never does.
await() {
  local what=$1 limit=$2
  shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      printf '%s: timed out after %ss waiting for %s\n' "$TOOL" "$limit" "$what" >&2
      return 1
    fi
    sleep 0.2
  done
}

# Debian $SUITE, minbase plus a C toolchain (the Rust build links with gcc), as a directory.
debian_tree() {
  local tree=$CACHE/$SUITE
  if [ ! -e "$tree/.complete" ]; then
    say "debootstrap $SUITE into $tree (once per machine)"
    rm -rf "$tree"
    mkdir -p "$CACHE"
    debootstrap --variant=minbase --include=gcc,libc6-dev,ca-certificates "$SUITE" "$tree" \
      http://deb.debian.org/debian >"$CACHE/debootstrap.log" 2>&1 ||
      fail "debootstrap failed (see $CACHE/debootstrap.log)"
    touch "$tree/.complete"
  fi
  printf '%s\n' "$tree"
}

# $DEBIAN_IMAGE: the tree above as an image.
debian_image() {
  podman image exists "$DEBIAN_IMAGE" && return
  local tree
  tree=$(debian_tree)
  say "importing $DEBIAN_IMAGE"
  tar -C "$tree" --exclude=./.complete -c . | podman import -q \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$DEBIAN_IMAGE" >/dev/null
}

# Starts scripts/container/upstream.py on a free port: sets UP_PORT and UPSTREAM_PID (kill it on exit).
start_upstream() {
  UP_PORT=$(free_port)
  python3 "$REPO/scripts/container/upstream.py" "$UP_PORT" &
  UPSTREAM_PID=$!
  await "the upstream" 10 curl -fsS "http://127.0.0.1:$UP_PORT/started" || fail "no upstream"
}
