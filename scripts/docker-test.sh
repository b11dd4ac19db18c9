#!/usr/bin/env bash
# The container image, tested with real Docker (no registry needed):
#  1. installs docker.io, docker-compose and debootstrap if missing, and
#     starts dockerd if none is running (stopped again at the end);
#  2. builds the base image from Debian's own mirror with debootstrap
#     (minbase bookworm, like debian:bookworm-slim; cached as
#     devicehub-test/base:bookworm);
#  3. builds the runtime image from the release binary
#     (`docker build --target runtime --build-arg BINARY=...`);
#  4. runs it on the host network, bound to loopback, and checks: the
#     container's healthcheck and `devicehub health` say SERVING, a reading
#     from a device reaches ListReadings, the service runs as the non-root
#     user, and SIGTERM (docker stop) ends it with exit code 0 within the
#     shutdown deadline;
#  5. brings up the compose demo (deploy/compose.yaml: Mosquitto with the
#     shipped configuration, from Debian's package in an image built the
#     same way; devicehub; the simulator), checks that the simulator's
#     readings arrive and a command round trip succeeds, and takes it down.
# Called by scripts/test.sh; DEVICEHUB_SKIP_DOCKER=1 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
step() { echo "== docker: $*"; }
fail() { echo "docker-test: FAILED: $*" >&2; exit 1; }

needs=()
[ -x /usr/sbin/dockerd ] || needs+=(docker.io)
command -v docker-compose >/dev/null || needs+=(docker-compose)
command -v debootstrap >/dev/null || needs+=(debootstrap)
if [ ${#needs[@]} -gt 0 ]; then
  step "installing ${needs[*]} (apt)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${needs[@]}" >/dev/null
fi
# Debian's client matches Debian's daemon and has BuildKit built in (a newer
# client elsewhere on PATH may want the buildx plugin).
DOCKER=docker
[ -x /usr/bin/docker ] && DOCKER=/usr/bin/docker
export DOCKER_BUILDKIT=1

work=$(mktemp -d /tmp/devicehub-docker.XXXXXX)
started_dockerd=""
containers=()
compose_project=""
cleanup() {
  for c in "${containers[@]}"; do $DOCKER rm -f "$c" >/dev/null 2>&1 || true; done
  if [ -n "$compose_project" ]; then
    compose down -v --remove-orphans >/dev/null 2>&1 || true
  fi
  if [ -n "${made_secrets:-}" ]; then rm -rf "$secrets_dir"; fi
  if [ -n "$started_dockerd" ]; then
    step "stopping the dockerd this script started"
    local pid
    pid=$(cat "$work/dockerd.pid" 2>/dev/null || true)
    if [ -n "$pid" ]; then
      as_root kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do as_root kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
  fi
  as_root rm -rf "$work"
}
trap cleanup EXIT

# Waits until "$@" succeeds: up to $1 tries 0.2 s apart (a condition, not a fixed sleep).
wait_for() {
  local tries=$1 what=$2; shift 2
  for _ in $(seq 1 "$tries"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  fail "timed out waiting for $what"
}

if ! $DOCKER info >/dev/null 2>&1; then
  step "starting dockerd"
  as_root dockerd --pidfile "$work/dockerd.pid" >"$work/dockerd.log" 2>&1 &
  started_dockerd=yes
  wait_for 150 "dockerd to answer" $DOCKER info || { cat "$work/dockerd.log" >&2; exit 1; }
fi

# An image from debootstrap (minbase bookworm, plus the packages given),
# built once and kept under its tag.
debootstrap_image() {
  local tag=$1 include=${2:-}
  if $DOCKER image inspect "$tag" >/dev/null 2>&1; then return; fi
  step "building $tag with debootstrap (minbase bookworm${include:+ + $include} from deb.debian.org)"
  local root="$work/rootfs"
  as_root debootstrap --variant=minbase ${include:+--include="$include"} bookworm "$root" \
    http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; fail "debootstrap"; }
  as_root rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
  as_root tar -C "$root" -c . | $DOCKER import - "$tag" >/dev/null
  as_root rm -rf "$root"
}
BASE=devicehub-test/base:bookworm
debootstrap_image "$BASE"

step "building the release binary and the runtime image"
cargo build --release --locked --quiet
IMAGE=devicehub-test/devicehub:latest
$DOCKER build --quiet --target runtime --build-arg BASE="$BASE" \
  --build-arg BINARY=target/release/devicehub -t "$IMAGE" . >/dev/null

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
GRPC=127.0.0.1:$(free_port)
MQTT=127.0.0.1:$(free_port)
METRICS=127.0.0.1:$(free_port)

step "running the image (host network, loopback only)"
name=devicehub-test-$$
containers+=("$name")
$DOCKER run -d --name "$name" --network host \
  --health-interval 1s --health-start-period 1s \
  -e DEVICEHUB_GRPC_ADDR="$GRPC" -e DEVICEHUB_EMBEDDED_MQTT_ADDR="$MQTT" \
  -e DEVICEHUB_METRICS_ADDR="$METRICS" -e DEVICEHUB_SHUTDOWN_TIMEOUT=5s \
  "$IMAGE" >/dev/null
health_of() { $DOCKER inspect -f '{{.State.Health.Status}}' "$name"; }
is_healthy() { [ "$(health_of)" = healthy ]; }
wait_for 150 "the container's healthcheck to pass" is_healthy \
  || { $DOCKER logs "$name" >&2; exit 1; }
[ "$(target/release/devicehub health --grpc-addr "$GRPC")" = SERVING ] || fail "devicehub health"

user=$($DOCKER exec "$name" id -un)
uid=$($DOCKER exec "$name" id -u)
[ "$user" = devicehub ] && [ "$uid" != 0 ] || fail "runs as $user ($uid), not the devicehub user"
pid=$($DOCKER inspect -f '{{.State.Pid}}' "$name")
[ "$(stat -c %u "/proc/$pid")" = "$uid" ] || fail "PID 1 of the container is not uid $uid"

step "a device's reading reaches ListReadings"
target/release/devicehub simulate --mqtt-url "mqtt://$MQTT" --devices 1 --interval-ms 100 \
  --device-prefix docker- >/dev/null 2>&1 &
sim=$!
has_reading() {
  grpcurl -plaintext -d '{"device_id": "docker-1", "page_size": 1}' "$GRPC" \
    devicehub.v1.DeviceHub/ListReadings | grep -q '"temperature"'
}
wait_for 100 "a reading of docker-1" has_reading
kill "$sim"; wait "$sim" 2>/dev/null || true

step "SIGTERM: exit 0 within the shutdown deadline"
start=$(date +%s)
$DOCKER stop -t 20 "$name" >/dev/null
took=$(( $(date +%s) - start ))
code=$($DOCKER inspect -f '{{.State.ExitCode}}' "$name")
[ "$code" = 0 ] || { $DOCKER logs "$name" >&2; fail "exit code $code after SIGTERM"; }
[ "$took" -le 10 ] || fail "stopping took ${took}s, more than the 5 s deadline allows"
# The daemon copies the container's output to its log asynchronously: the
# last line may show up a moment after the container has exited.
# (Not `grep -q`: it would stop reading at the match, and the pipe's other
# end failing with SIGPIPE would fail the pipeline under pipefail.)
clean_stop() { $DOCKER logs "$name" 2>&1 | grep '"message":"stopped"' >/dev/null; }
stopped_cleanly() {
  for _ in $(seq 1 25); do clean_stop && return 0; sleep 0.2; done
  return 1
}
stopped_cleanly || { $DOCKER logs "$name" 2>&1 | tail -20 >&2; fail "no clean stop in the log"; }

step "the compose demo: Mosquitto (shipped config), devicehub, the simulator"
# Mosquitto from Debian's package, standing in for eclipse-mosquitto:2.
MOSQUITTO=devicehub-test/mosquitto:bookworm
debootstrap_image "$MOSQUITTO" mosquitto
secrets_dir=deploy/demo-secrets
made_secrets=""
if [ ! -e "$secrets_dir" ]; then
  bash deploy/compose-secrets.sh "$secrets_dir" >/dev/null
  made_secrets=yes
fi
DEMO_PORT=$(free_port)
compose_project=devicehub-test-$$
compose() {
  DEVICEHUB_IMAGE="$IMAGE" MOSQUITTO_IMAGE="$MOSQUITTO" DEVICEHUB_GRPC_PORT="$DEMO_PORT" \
    docker-compose -p "$compose_project" -f deploy/compose.yaml "$@"
}
compose up -d >"$work/compose.log" 2>&1 || { cat "$work/compose.log" >&2; fail "compose up"; }
demo=127.0.0.1:$DEMO_PORT
sim_reading() {
  grpcurl -plaintext -d '{"device_id": "sim-1", "page_size": 1}' "$demo" \
    devicehub.v1.DeviceHub/ListReadings | grep -q '"temperature"'
}
wait_for 300 "a simulated reading through the demo" sim_reading \
  || { compose logs >&2; exit 1; }
reply=$(grpcurl -plaintext -d '{"device_id": "sim-2", "command": "PING", "reply_timeout": "5s"}' \
  "$demo" devicehub.v1.DeviceHub/SendCommand)
echo "$reply" | grep -q COMMAND_STATUS_OK || { compose logs >&2; fail "command round trip: $reply"; }
compose down -v --remove-orphans >/dev/null 2>&1
compose_project=""

step "passed"
