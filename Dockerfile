# The flowgate host and the stock plugins in one image.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN rustup target add wasm32-wasip2 \
 && cargo build --release -p flowgate \
 && cargo build --target wasm32-wasip2 --profile plugin \
      -p flowgate-validate -p flowgate-dedup -p flowgate-window -p flowgate-pct-change

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/flowgate /usr/local/bin/flowgate
COPY --from=build /src/target/wasm32-wasip2/plugin/*.wasm /opt/flowgate/target/wasm32-wasip2/plugin/
COPY pipelines /opt/flowgate/pipelines
WORKDIR /opt/flowgate
ENTRYPOINT ["flowgate"]
