# syntax=docker/dockerfile:1
#
# croupier container image.
#   docker build -t croupier .
#   docker run --rm -p 8080:8080 croupier            # embedded mode (SQLite)
#   docker run --rm croupier migrate                 # with DATABASE_URL set
#
# The build uses BuildKit cache mounts for the cargo registry and target
# directory, so rebuilding after a source change does not recompile every
# dependency.

FROM rust:1-bookworm AS builder
WORKDIR /build

COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked --bin croupier \
 && install -D -m 0755 target/release/croupier /out/croupier


FROM debian:bookworm-slim AS runtime

# ca-certificates: TLS to managed PostgreSQL / Redis.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 croupier \
 && useradd --system --uid 10001 --gid croupier --no-create-home \
        --home-dir /var/lib/croupier --shell /usr/sbin/nologin croupier \
 && install -d -o croupier -g croupier -m 0750 /var/lib/croupier

COPY --from=builder /out/croupier /usr/local/bin/croupier

# Embedded mode keeps its SQLite file in DATA_DIR; cluster mode ignores it.
ENV BIND=0.0.0.0 \
    PORT=8080 \
    DATA_DIR=/var/lib/croupier \
    RUST_LOG=info

USER 10001:10001
WORKDIR /var/lib/croupier
EXPOSE 8080
# On SIGTERM the server stops being ready, closes sockets with 1001 and
# exits within SHUTDOWN_GRACE seconds.
STOPSIGNAL SIGTERM

ENTRYPOINT ["croupier"]
CMD ["serve"]
