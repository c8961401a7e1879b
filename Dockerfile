# Build: docker build -t mediaplane .   (docker compose up builds it too)
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin mediaplane

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/mediaplane /usr/local/bin/mediaplane
RUN mkdir -p /var/lib/mediaplane && chown 65532:65532 /var/lib/mediaplane
USER 65532:65532
ENV MEDIAPLANE_ADDR=0.0.0.0:8080 MEDIAPLANE_ADMIN_ADDR=0.0.0.0:9090 MEDIAPLANE_LOG_FORMAT=json
EXPOSE 8080 9090
ENTRYPOINT ["mediaplane"]
CMD ["serve"]
