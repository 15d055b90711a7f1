# The gateway's container image, for building with Docker (see README, "Image"):
#
#   docker build --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) -t turnstile:0.1.0 .
#
# `cargo xtask image` builds the same layout without a Docker daemon, kernel assist included;
# a test in xtask/src/image.rs keeps this file's final stage and that command in step.

# Builder: Debian bookworm (the libraries copied below are its own) and the workspace's Rust.
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Userspace-only: the kernel programs need nightly with rust-src and bpf-linker, which
# `cargo xtask setup` installs and this stage does not, so `--ebpf auto` falls back at start.
RUN TURNSTILE_SKIP_EBPF=1 cargo build --release --locked -p gateway-user --bin turnstile
# The root filesystem as `cargo xtask image` stages it: the binary without debug info, the
# shared libraries ldd names (the ELF interpreter included), Debian's CA bundle, image/rootfs/.
RUN set -eu; \
    mkdir -p /rootfs/usr/local/bin /rootfs/etc/ssl/certs; \
    strip --strip-debug -o /rootfs/usr/local/bin/turnstile target/release/turnstile; \
    if ldd target/release/turnstile | grep 'not found'; then exit 1; fi; \
    for lib in $(ldd target/release/turnstile | grep -o '/[^ ]*'); do \
        mkdir -p "/rootfs$(dirname "$lib")"; \
        cp -L "$lib" "/rootfs$lib"; \
    done; \
    cp /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/ca-certificates.crt
COPY image/rootfs/ /rootfs/

FROM scratch
ARG VERSION
ARG REVISION
ARG SOURCE
ARG CREATED
COPY --from=build /rootfs/ /
# The userspace overlay's runAsUser and runAsGroup, numeric so runAsNonRoot can be checked.
USER 65534:65534
WORKDIR /
EXPOSE 8888/tcp 8080/tcp
ENTRYPOINT ["/usr/local/bin/turnstile"]
CMD ["serve"]
LABEL org.opencontainers.image.title="turnstile" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.revision="$REVISION" \
      org.opencontainers.image.source="$SOURCE" \
      org.opencontainers.image.created="$CREATED"
