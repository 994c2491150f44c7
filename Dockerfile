# syntax=docker/dockerfile:1
#
# sds-server as a container: a static binary (CGO_ENABLED=0) on distroless,
# run as the non-root user 65532.
#
#   docker build -t sds-server .                 # the final stage: sds-server
#   docker build --target init -t sds-init .     # the init helper (below)
#
# The "init" stage is the helper image the one-shot steps of
# docker-compose.yml run: the same sds-server binary, e2e/stepcainit (creates
# a step-ca for sds-server) and the two scripts of examples/emojivoto/compose,
# on distroless's debug variant for its busybox shell. Still non-root.
ARG GO_VERSION=1.26

FROM golang:${GO_VERSION} AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
ARG COMMIT=
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION} -X main.commit=${COMMIT}" -o /out/sds-server ./cmd/sds-server \
 && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o /out/stepcainit ./e2e/stepcainit \
 && mkdir -p /out/empty \
 && mkdir -m 700 /out/private

FROM gcr.io/distroless/static-debian12:debug-nonroot AS init
COPY --from=build /out/sds-server /out/stepcainit /usr/local/bin/
COPY examples/emojivoto/compose/join.sh /usr/local/bin/sds-join
COPY examples/emojivoto/compose/stepca-init.sh /usr/local/bin/stepca-init
# Mount points owned by 65532, so that fresh named volumes mounted there are
# too (Docker copies the ownership of the image's directory).
COPY --from=build --chown=65532:65532 /out/empty /stepca
COPY --from=build --chown=65532:65532 /out/empty /sds-ca
COPY --from=build --chown=65532:65532 /out/empty /bootstrap
USER 65532:65532
ENTRYPOINT ["/busybox/sh"]

FROM gcr.io/distroless/static-debian12:nonroot AS sds-server
COPY --from=build /out/sds-server /usr/local/bin/sds-server
# The data dir is 0700 from the start (serve would otherwise tighten it).
COPY --from=build --chown=65532:65532 /out/private /data
COPY --from=build --chown=65532:65532 /out/empty /run/sds
USER 65532:65532
ENV SDS_DATA_DIR=/data
# SDS (gRPC over TLS) and metrics; set SDS_LISTEN_ADDR / SDS_METRICS_ADDR to
# 0.0.0.0:... to reach them from other containers.
EXPOSE 8443 9102
ENTRYPOINT ["/usr/local/bin/sds-server"]
CMD ["serve"]
