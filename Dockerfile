# syntax=docker/dockerfile:1
# tally as a container image:  docker build -t tally .
# Needs BuildKit (the default builder since Docker 23) for the cache mounts below.

# ---- build ----
FROM rust:1-bookworm AS builder
# rdkafka-sys compiles librdkafka from source (its configure script and make; the crate's
# cmake-build feature is off) with the `ssl` feature against the system OpenSSL, and
# libz-sys links the system zlib. The rust image ships most of this already; naming it keeps
# the build working if the base image ever slims down.
RUN apt-get update \
 && apt-get install -y --no-install-recommends make pkg-config libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# examples/ is needed to compile: `tally demo` embeds examples/s1-uvpv.toml.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY examples ./examples
# The registry and target/ live in cache mounts, so a rebuild after a source change
# recompiles tally itself, not its ~190 dependency crates. A cache mount is not part of the
# image, so the binary is copied out in the same step. The release profile keeps line tables
# (debug = 1) for backtraces; compressing them shrinks the binary a lot.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tally \
 && objcopy --compress-debug-sections target/release/tally /usr/local/bin/tally

# ---- run ----
FROM debian:bookworm-slim
# What the binary links dynamically besides glibc and libgcc: libssl.so.3 / libcrypto.so.3
# (libssl3) and libz.so.1 (zlib1g, already in the base image). ca-certificates for SASL_SSL.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 tally \
 && useradd --system --uid 10001 --gid tally --home-dir /var/lib/tally --no-create-home \
      --shell /usr/sbin/nologin tally \
 && mkdir -p /var/lib/tally \
 && chown tally:tally /var/lib/tally
COPY --from=builder /usr/local/bin/tally /usr/local/bin/tally
COPY examples/ /etc/tally/
# The examples listen on 127.0.0.1, which nothing outside a container can reach: in the
# image they listen on every interface, so `docker run -p 8080:8080` works.
RUN sed -i 's/^listen = "127\.0\.0\.1:8080"/listen = "0.0.0.0:8080"/' /etc/tally/*.toml
USER 10001:10001
# The examples' relative state dirs (tally-state/...) land here, on the volume.
WORKDIR /var/lib/tally
VOLUME /var/lib/tally
EXPOSE 8080
ENTRYPOINT ["tally"]
CMD ["run", "--config", "/etc/tally/s1-uvpv.toml"]
