# devicehub's container image.
#
#   docker build -t devicehub .              # compiles inside Docker (needs registry access)
#   docker build --target runtime --build-arg BINARY=target/release/devicehub -t devicehub .
#                                            # packages a binary built outside (no Rust image)
#
# The runtime stage runs as an unprivileged user and stops cleanly on SIGTERM
# (devicehub is PID 1 and handles it: health NOT_SERVING, streams ended with a
# resume point, MQTT disconnected, exit 0 within --shutdown-timeout).
# BuildKit builds only the stages the target needs: with BINARY set, the
# Rust builder is never pulled.

ARG BASE=debian:bookworm-slim
ARG BINARY=

# ---- builder: the official Rust image, the locked dependency set.
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked && cp target/release/devicehub /devicehub

# ---- where the binary comes from: the builder, or the build context.
FROM builder AS binary-from-
FROM scratch AS binary-from-context
ARG BINARY
COPY ${BINARY} /devicehub
FROM binary-from-${BINARY:+context} AS binary

# ---- runtime
FROM ${BASE} AS runtime
COPY --from=binary /devicehub /usr/local/bin/devicehub
RUN useradd --uid 10001 --no-create-home --no-log-init --shell /usr/sbin/nologin devicehub
USER devicehub
# Inside a container the service has to listen beyond loopback, and beyond
# loopback devicehub refuses to start without TLS and token auth on the gRPC
# port: set DEVICEHUB_TLS_CERT, DEVICEHUB_TLS_KEY and DEVICEHUB_AUTH_JWT_KEY
# (files mounted into the container) and DEVICEHUB_MQTT_URL for your broker.
# Only a demo sets DEVICEHUB_ALLOW_INSECURE=true instead (deploy/compose.yaml).
# The embedded broker (no TLS, no passwords) stays on the container's
# loopback: the image never exposes an unauthenticated broker. A trial that
# wants devices to reach it sets DEVICEHUB_EMBEDDED_MQTT_ADDR=0.0.0.0:1883 and
# DEVICEHUB_ALLOW_INSECURE_EMBEDDED_BROKER=true.
ENV DEVICEHUB_GRPC_ADDR=0.0.0.0:50051 \
    DEVICEHUB_METRICS_ADDR=0.0.0.0:9464 \
    DEVICEHUB_LOG_FORMAT=json
EXPOSE 50051 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/devicehub", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/devicehub"]
CMD ["serve"]
