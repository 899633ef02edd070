# gatherd container image (issue 6): Debian 12, runs as a numeric non-root user.
#
#   docker build -t gatherd .
#   docker run --rm -p 8080:8080 -p 127.0.0.1:9180:9180 --ulimit nofile=65536:65536 gatherd
#   docker run --rm -v "$PWD/my.json:/etc/gatherd/gatherd.json:ro" gatherd      # your routes
#
# The configuration is /etc/gatherd/gatherd.json (deploy/docker/gatherd.json: listen
# 0.0.0.0:8080, admin 0.0.0.0:9180, logs on stderr). gatherd runs in the foreground as
# PID 1 of the container: SIGTERM (docker stop, Kubernetes) stops it gracefully within
# shutdown_timeout_ms (give "docker stop -t" more than that), SIGHUP reloads.
# No HEALTHCHECK: the slim image has no HTTP client; probe the admin port from outside
# (/healthz, /readyz), as deploy/k8s/deployment.yaml does.

# --- build ---------------------------------------------------------------------------
FROM debian:12 AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential autoconf automake pkg-config libevent-dev libjansson-dev libssl-dev node-llhttp \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN autoreconf -fi \
 && ./configure --prefix=/usr --sysconfdir=/etc \
 && make -j"$(nproc)" \
 && make install DESTDIR=/out \
 && /out/usr/sbin/gatherd -V

# --- runtime -------------------------------------------------------------------------
FROM debian:12-slim AS runtime
# Exactly the shared libraries "ldd gatherd" names (tests/integration/test_deploy.py
# checks this list against the binary), and the CA store for https:// backends.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libevent-core-2.1-7 libevent-extra-2.1-7 libevent-openssl-2.1-7 libjansson4 libssl3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/usr/sbin/gatherd /usr/sbin/gatherd
COPY deploy/docker/gatherd.json /etc/gatherd/gatherd.json
# Fails the build when a library is missing or the configuration is invalid.
RUN ["/usr/sbin/gatherd", "-t", "-c", "/etc/gatherd/gatherd.json"]
# A numeric user: no passwd entry needed, and Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
EXPOSE 8080 9180
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/sbin/gatherd"]
CMD ["-c", "/etc/gatherd/gatherd.json"]
