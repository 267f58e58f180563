#!/usr/bin/env bash
# Builds the Debian package with cargo-deb and checks it where a user would install it: a clean Debian
# bookworm container (podman; the image is made locally with debootstrap, see scripts/container/lib.sh).
#
#   1. `cargo deb` (cargo-deb is installed with `cargo install` when missing): the release binary, the
#      hardened unit (packaging/idemproxy.service), the example config as a conffile.
#   2. in the container: `apt-get install ./idemproxy_*.deb` resolves its dependencies and installs; the
#      files are where the unit expects them; the unit is enabled; `idemproxy check` accepts the
#      packaged config (exactly as the unit's ExecStartPre runs it).
#   3. smoke requests from the host (host network): `idemproxy demo` from the package replays a keyed
#      POST; the unit's ExecStart command, as an unprivileged user, with the packaged config pointed at
#      an upstream, forwards once and replays; SIGTERM exits 0.
#   4. `dpkg --purge` removes the binary and the unit.
#
# Needs root and Debian. About 30 s once the release binary and the base image are there.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
TOOL=deb
# shellcheck source=scripts/container/lib.sh
. scripts/container/lib.sh

NAME=idemproxy-deb-$$
cleanup() {
  set +e
  [ -n "${UPSTREAM_PID:-}" ] && kill "$UPSTREAM_PID" 2>/dev/null
  podman rm -f -t 0 "$NAME" >/dev/null 2>&1
}
trap cleanup EXIT

started=$SECONDS
ensure_podman
if ! command -v cargo-deb >/dev/null 2>&1; then
  say "installing cargo-deb (cargo install, once per machine)"
  cargo install --locked --quiet cargo-deb
fi
say "cargo deb"
deb=$(cargo deb --quiet 2>/dev/null | grep '\.deb$' | tail -1)
[ -f "$deb" ] || fail "cargo deb made no package (got '$deb')"
say "$(basename "$deb"): $(($(stat -c %s "$deb") / 1000)) kB"
dpkg-deb --info "$deb" | grep -E '^ (Package|Version|Depends|Section):' >&2

debian_image
start_upstream
PROXY_PORT=$(free_port)
ADMIN_PORT=$(free_port)
DEMO_PORT=$(free_port)

# A clean Debian, the package mounted read-only; it runs until removed, commands go in with exec.
podman run -d --name "$NAME" --network host -v "$(dirname "$deb"):/pkg:ro" "$DEBIAN_IMAGE" sleep infinity >/dev/null
in_ct() { podman exec "$NAME" "$@"; }

say "install"
in_ct dpkg -i "/pkg/$(basename "$deb")" >/dev/null || fail "dpkg -i"
in_ct dpkg -s idemproxy | grep -q '^Status: install ok installed' || fail "not installed"
for f in /usr/bin/idemproxy /etc/idemproxy/idemproxy.toml /lib/systemd/system/idemproxy.service \
  /usr/share/doc/idemproxy/README.md /usr/share/doc/idemproxy/copyright /usr/share/idemproxy/idemproxy.schema.json; do
  in_ct test -f "$f" || fail "$f is not installed"
done
in_ct test -L /etc/systemd/system/multi-user.target.wants/idemproxy.service || fail "the unit is not enabled"
in_ct grep -q '^/etc/idemproxy/idemproxy.toml$' /var/lib/dpkg/info/idemproxy.conffiles || fail "the config is not a conffile"
[ "$(in_ct stat -c %a /usr/bin/idemproxy)" = 755 ] || fail "binary mode"

say "check, as the unit's ExecStartPre"
pre=$(in_ct sed -n 's/^ExecStartPre=//p' /lib/systemd/system/idemproxy.service)
# shellcheck disable=SC2086
in_ct $pre || fail "'$pre' failed"

say "demo from the package"
in_ct sh -c "idemproxy demo --listen 127.0.0.1:$DEMO_PORT >/tmp/demo.log 2>&1 &"
await "the demo" 20 curl -fsS -o /dev/null -X POST -H 'Idempotency-Key: probe' "http://127.0.0.1:$DEMO_PORT/" ||
  { in_ct cat /tmp/demo.log >&2; fail "the demo does not answer"; }
a=$(curl -fsS -D - -X POST -H 'Idempotency-Key: demo-1' -d 'x' "http://127.0.0.1:$DEMO_PORT/orders")
b=$(curl -fsS -D - -X POST -H 'Idempotency-Key: demo-1' -d 'x' "http://127.0.0.1:$DEMO_PORT/orders")
grep -qi '^idempotent-replayed: true' <<<"$b" || fail "the demo did not replay: $b"
[ "$(sed -n '/^\r$/,$p' <<<"$a")" = "$(sed -n '/^\r$/,$p' <<<"$b")" ] || fail "the demo's replay differs"

say "the unit's ExecStart, unprivileged, with the packaged config"
start=$(in_ct sed -n 's/^ExecStart=//p' /lib/systemd/system/idemproxy.service)
in_ct sh -c "useradd --system idemproxy-test && mkdir -p /var/lib/idemproxy && chown idemproxy-test /var/lib/idemproxy"
podman exec -i "$NAME" sh -c 'cat >/tmp/run.sh' <<EOT
#!/bin/sh
echo \$\$ >/tmp/run.pid
export IDEMPROXY_UPSTREAM=http://127.0.0.1:$UP_PORT IDEMPROXY_LISTEN=127.0.0.1:$PROXY_PORT
export IDEMPROXY_ADMIN_LISTEN=127.0.0.1:$ADMIN_PORT
exec setpriv --reuid idemproxy-test --regid idemproxy-test --init-groups $start
EOT
in_ct sh -c '(sh /tmp/run.sh >/tmp/run.log 2>&1; echo $? >/tmp/run.exit) &'
await "the packaged proxy" 20 curl -fsS "http://127.0.0.1:$ADMIN_PORT/readyz" ||
  { in_ct cat /tmp/run.log >&2; fail "not ready"; }
one=$(curl -fsS -X POST -H 'Idempotency-Key: pkg-1' -d 'charge 5' "http://127.0.0.1:$PROXY_PORT/pay")
two=$(curl -fsS -D - -X POST -H 'Idempotency-Key: pkg-1' -d 'charge 5' "http://127.0.0.1:$PROXY_PORT/pay")
grep -qi '^idempotent-replayed: true' <<<"$two" || fail "not replayed: $two"
[ "$one" = "$(sed -n '/^\r$/,$p' <<<"$two" | tail -n +2)" ] || fail "replay '$two' differs from '$one'"
[ "$(curl -fsS "http://127.0.0.1:$UP_PORT/started")" = 1 ] || fail "the upstream ran it twice"
[ "$(in_ct stat -c %U /var/lib/idemproxy/db)" = idemproxy-test ] || fail "the store is not the service user's"
in_ct sh -c 'kill -TERM "$(cat /tmp/run.pid)"'
await "the packaged proxy to exit" 45 in_ct test -s /tmp/run.exit || fail "no exit after SIGTERM"
[ "$(in_ct cat /tmp/run.exit)" = 0 ] || { in_ct cat /tmp/run.log >&2; fail "exit code $(in_ct cat /tmp/run.exit) after SIGTERM"; }

say "purge"
in_ct dpkg --purge idemproxy >/dev/null || fail "dpkg --purge"
in_ct test ! -e /usr/bin/idemproxy || fail "the binary is left after purge"
in_ct test ! -e /lib/systemd/system/idemproxy.service || fail "the unit is left after purge"
say "all checks passed in $((SECONDS - started))s"
