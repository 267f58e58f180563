#!/usr/bin/env bash
# Builds the container image from the real Dockerfile with podman, runs it and checks it as a user's
# runtime would see it:
#
#   1. base images. The Dockerfile's defaults are the official Rust image and distroless; no image
#      registry is reachable here, so local stand-ins are made from Debian packages and passed as
#      --build-arg BUILD_IMAGE / RUNTIME_IMAGE (USE_REGISTRY=1 builds with the defaults instead):
#      - rust: Debian bookworm (debootstrap minbase + gcc) with this machine's Rust toolchain in
#        /usr/local/rust and CARGO_HOME=/usr/local/cargo, as in the official image, trusting the CAs
#        this machine added (/usr/local/share/ca-certificates: crates are fetched through its proxy);
#      - distroless-cc: only the files of the packages distroless/cc-debian12 has (libc6, libgcc-s1,
#        libssl3, libstdc++6, libgomp1, base-files, tzdata, the CA bundle) and its users (nonroot =
#        65532); no shell, no package manager.
#   2. `podman build --format docker` (the OCI format drops HEALTHCHECK) from the repo as context, so
#      .dockerignore applies. The cargo registry and target dir are the Dockerfile's cache mounts, kept
#      by podman between builds.
#   3. the image, run with the host's network, a volume at /data and a read-only root filesystem:
#      - a keyed POST is forwarded once and its retry replayed byte for byte;
#      - the image's HEALTHCHECK command exits 0 (`podman healthcheck run`);
#      - the process runs as 65532:65532, its root filesystem is mounted read-only;
#      - SIGTERM with a request in flight: the request is answered, the container exits 0;
#      - a new container on the same volume replays the key (the record survived);
#      - the image's size is printed (and bounded).
#
# podman 4 logs an error for each health-check timer it cannot ask systemd for (none runs here); the
# checks run the HEALTHCHECK themselves, so those lines are dropped.
quiet_systemd() { grep -v 'unable to get systemd connection' >&2 || true; }
#
# Needs root and Debian (it installs podman, runc and debootstrap when missing). About 1 minute with
# everything cached, 5-6 on a fresh machine.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
TOOL=container
# shellcheck source=scripts/container/lib.sh
. scripts/container/lib.sh

IMAGE=localhost/idemproxy:ci
RUST_IMAGE=localhost/idemproxy-ci/rust:$SUITE-$(rustc --version | cut -d' ' -f2)
RUNTIME_IMAGE=localhost/idemproxy-ci/distroless-cc:$SUITE
# Bound on the image (distroless/cc is about 23 MB, the binary about 15 MB).
MAX_IMAGE_MB=${MAX_IMAGE_MB:-80}

# The Rust stand-in: Debian + this machine's toolchain (rustc, cargo and the standard library).
rust_image() {
  podman image exists "$RUST_IMAGE" && return
  debian_image
  local sysroot
  sysroot=$(rustc --print sysroot)
  say "building $RUST_IMAGE from $sysroot"
  # The build fetches crates: it trusts what this machine trusts (a TLS-inspecting egress proxy's CA).
  local cas
  cas=$(mktemp -d)
  find /usr/local/share/ca-certificates -name '*.crt' -exec cp {} "$cas/" ';' 2>/dev/null || true
  podman build -q -v "$cas:/host-ca:ro" -t "$RUST_IMAGE" -f - "$sysroot" >/dev/null <<EOT
FROM $DEBIAN_IMAGE
RUN find /host-ca -name '*.crt' -exec cp {} /usr/local/share/ca-certificates/ ';' && update-ca-certificates
COPY bin /usr/local/rust/bin
COPY lib /usr/local/rust/lib
COPY libexec /usr/local/rust/libexec
ENV CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN cargo --version && rustc --version && cc --version | head -1
EOT
  rm -rf "$cas"
}

# The distroless stand-in: package files only, nonroot user, no shell.
runtime_image() {
  podman image exists "$RUNTIME_IMAGE" && return
  local tree root list
  tree=$(debian_tree)
  root=$(mktemp -d)
  list=$(mktemp)
  say "building $RUNTIME_IMAGE"
  # The merged-/usr directories and links first, then every file the packages own (no docs, manuals).
  printf '%s\n' usr usr/bin usr/lib usr/lib64 usr/sbin bin lib lib64 sbin >"$list"
  for pkg in base-files tzdata libc6 libgcc-s1 libssl3 libstdc++6 libgomp1; do
    chroot "$tree" dpkg -L "$pkg" | sed 's,^/,,' | grep -v -E '^(usr/share/(doc|man|lintian|info)/|$|\.$)' >>"$list"
  done
  printf '%s\n' etc/ssl/certs/ca-certificates.crt >>"$list"
  tar -C "$tree" --no-recursion -c -T "$list" | tar -C "$root" --keep-directory-symlink -x
  mkdir -p "$root/etc" "$root/tmp" "$root/home/nonroot"
  chmod 1777 "$root/tmp"
  chown 65532:65532 "$root/home/nonroot"
  cat >"$root/etc/passwd" <<'EOT'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOT
  cat >"$root/etc/group" <<'EOT'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOT
  [ ! -e "$root/bin/sh" ] || fail "the runtime stand-in has a shell"
  tar -C "$root" -c . | podman import -q \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'USER 65532' --change 'WORKDIR /home/nonroot' - "$RUNTIME_IMAGE" >/dev/null
  rm -rf "$root" "$list"
}

cleanup() {
  set +e
  [ -n "${UPSTREAM_PID:-}" ] && kill "$UPSTREAM_PID" 2>/dev/null
  podman rm -f -t 0 "$NAME" "$NAME-2" >/dev/null 2>&1
  podman volume rm -f "$VOLUME" >/dev/null 2>&1
}

started=$SECONDS
ensure_podman
build_args=()
if [ "${USE_REGISTRY:-0}" != 1 ]; then
  rust_image
  runtime_image
  build_args=(--build-arg "BUILD_IMAGE=$RUST_IMAGE" --build-arg "RUNTIME_IMAGE=$RUNTIME_IMAGE")
fi
say "podman build ${build_args[*]:-(the default base images)}"
t=$SECONDS
podman build --format docker --network host "${build_args[@]}" -t "$IMAGE" -f Dockerfile . >"${TMPDIR:-/tmp}/idemproxy-image-build.log" 2>&1 ||
  { tail -40 "${TMPDIR:-/tmp}/idemproxy-image-build.log" >&2; fail "podman build"; }
say "image built in $((SECONDS - t))s"

NAME=idemproxy-ci-$$
VOLUME=idemproxy-ci-data-$$
trap cleanup EXIT
start_upstream
PROXY_PORT=$(free_port)
ADMIN_PORT=$(free_port)

run_container() {
  # No systemd here to schedule the HEALTHCHECK: it is kept, and run below by `podman healthcheck run`.
  podman run -d --name "$1" --network host --read-only -v "$VOLUME:/data" --health-interval disable \
    -e "IDEMPROXY_UPSTREAM=http://127.0.0.1:$UP_PORT" \
    -e "IDEMPROXY_LISTEN=127.0.0.1:$PROXY_PORT" \
    -e "IDEMPROXY_ADMIN_LISTEN=127.0.0.1:$ADMIN_PORT" \
    "$IMAGE" 2> >(quiet_systemd) >/dev/null
  await "the container's /readyz" 30 curl -fsS "http://127.0.0.1:$ADMIN_PORT/readyz" ||
    { podman logs "$1" >&2; fail "not ready"; }
}

post() { # post PATH KEY BODY OUTFILE -> headers+body in OUTFILE
  curl -sS -D "$4.h" -o "$4" -X POST -H "Idempotency-Key: $2" -H 'Content-Type: text/plain' \
    --data-binary "$3" "http://127.0.0.1:$PROXY_PORT$1"
}

run_container "$NAME"
W=$(mktemp -d)

say "replay through the container"
post /pay order-1 'charge 42' "$W/first"
post /pay order-1 'charge 42' "$W/second"
grep -q '^HTTP/1.1 201' "$W/first.h" || fail "first answer: $(cat "$W/first.h")"
grep -q '^HTTP/1.1 201' "$W/second.h" || fail "retry answer: $(cat "$W/second.h")"
cmp -s "$W/first" "$W/second" || fail "the replay differs: '$(cat "$W/first")' vs '$(cat "$W/second")'"
grep -qi '^idempotent-replayed: true' "$W/second.h" || fail "the retry is not marked replayed"
[ "$(curl -fsS "http://127.0.0.1:$UP_PORT/started")" = 1 ] || fail "the upstream ran the request more than once"

say "HEALTHCHECK"
hc=$(podman inspect --type image -f '{{json .HealthCheck.Test}}' "$IMAGE")
[ "$hc" = '["CMD","/usr/local/bin/idemproxy","health"]' ] || fail "HEALTHCHECK of the image: $hc"
podman healthcheck run "$NAME" || fail "the HEALTHCHECK command did not exit 0"

say "user and read-only root"
pid=$(podman inspect -f '{{.State.Pid}}' "$NAME")
uids=$(awk '/^Uid:/ {print $2, $3, $4, $5}' "/proc/$pid/status")
gids=$(awk '/^Gid:/ {print $2, $3, $4, $5}' "/proc/$pid/status")
[ "$uids" = "65532 65532 65532 65532" ] || fail "uids $uids"
[ "$gids" = "65532 65532 65532 65532" ] || fail "gids $gids"
root_opts=$(awk '$5 == "/" {print $6}' "/proc/$pid/mountinfo")
case ",$root_opts," in *,ro,*) ;; *) fail "root filesystem mounted $root_opts" ;; esac
[ "$(podman inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$NAME")" = true ] || fail "not --read-only"
if podman exec "$NAME" /bin/sh -c true >/dev/null 2>&1; then fail "the image has a shell"; fi

say "SIGTERM with a request in flight"
before=$(curl -fsS "http://127.0.0.1:$UP_PORT/started")
post /slow order-2 'charge 7' "$W/slow" &
slow=$!
arrived() { [ "$(curl -fsS "http://127.0.0.1:$UP_PORT/started")" -gt "$before" ]; }
await "the slow request at the upstream" 10 arrived || fail "the slow request did not arrive"
podman kill --signal TERM "$NAME" >/dev/null
wait "$slow" || fail "the in-flight request failed"
grep -q '^HTTP/1.1 201' "$W/slow.h" || fail "in-flight request answered $(head -1 "$W/slow.h")"
code=$(timeout 40 podman wait "$NAME") || fail "the container did not exit after SIGTERM"
[ "$code" = 0 ] || { podman logs "$NAME" | tail -20 >&2; fail "exit code $code after SIGTERM"; }

say "a new container on the same volume replays"
run_container "$NAME-2"
post /slow order-2 'charge 7' "$W/again"
cmp -s "$W/slow" "$W/again" || fail "after the restart: '$(cat "$W/again")', was '$(cat "$W/slow")'"
grep -qi '^idempotent-replayed: true' "$W/again.h" || fail "not replayed after the restart"
podman stop -t 40 "$NAME-2" 2> >(quiet_systemd) >/dev/null
[ "$(podman inspect -f '{{.State.ExitCode}}' "$NAME-2")" = 0 ] || fail "podman stop: exit code not 0"

bytes=$(podman image inspect -f '{{.Size}}' "$IMAGE")
mb=$((bytes / 1000000))
binary=$(podman run --rm --no-healthcheck --entrypoint /usr/local/bin/idemproxy "$IMAGE" --version)
base_bytes=0
[ "${USE_REGISTRY:-0}" = 1 ] || base_bytes=$(podman image inspect -f '{{.Size}}' "$RUNTIME_IMAGE")
say "image $IMAGE: $mb MB ($bytes bytes), $binary; runtime base $((base_bytes / 1000000)) MB"
[ "$mb" -le "$MAX_IMAGE_MB" ] || fail "the image is ${mb} MB, over ${MAX_IMAGE_MB} MB"
rm -rf "$W"
say "all checks passed in $((SECONDS - started))s"
