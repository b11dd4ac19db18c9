#!/usr/bin/env bash
# Creates what deploy/compose.yaml's demo needs, in deploy/demo-secrets/ (or
# the directory given): a CA and Mosquitto's certificate (for the host name
# "mosquitto"), Mosquitto's password file with the accounts devicehub,
# sim-1, sim-2 and sim-3, and the password files devicehub and each
# simulated device read (devices/<id>-password: one password per device, so
# that the ACL means something: one device's password is no other's). Needs openssl and mosquitto_passwd (Debian: mosquitto).
# Demo material: random passwords, files readable by the containers' users.
set -euo pipefail
out=${1:-"$(dirname "$0")/demo-secrets"}
mkdir -p "$out/certs"
cd "$out"

openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=devicehub demo CA" \
  -keyout certs/ca.key -out certs/ca.crt 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=mosquitto" \
  -keyout certs/server.key -out certs/server.csr 2>/dev/null
printf 'subjectAltName=DNS:mosquitto,DNS:localhost,IP:127.0.0.1\n' >certs/server.ext
openssl x509 -req -in certs/server.csr -CA certs/ca.crt -CAkey certs/ca.key -CAcreateserial \
  -days 365 -extfile certs/server.ext -out certs/server.crt 2>/dev/null
rm -f certs/server.csr certs/server.ext certs/ca.srl certs/ca.key

password() { head -c 18 /dev/urandom | base64 | tr -d '/+='; }
service_password=$(password)
printf '%s\n' "$service_password" >devicehub-password
rm -f passwd device-password
mkdir -p devices
mosquitto_passwd -c -b passwd devicehub "$service_password"
for device in sim-1 sim-2 sim-3; do
  device_password=$(password)
  printf '%s\n' "$device_password" >"devices/$device-password"
  mosquitto_passwd -b passwd "$device" "$device_password"
done
# The containers run as their own users (devicehub, mosquitto).
chmod 0644 passwd devicehub-password devices/* certs/*
chmod 0755 . certs devices
echo "demo secrets in $out"
