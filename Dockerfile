# syntax=docker/dockerfile:1
# The metaleg node agent image: ghcr.io/metaleg/metaleg-agent.
#
#   docker build -t metaleg-agent .
#
# Stage 1 builds the project wheel and wheels of all its dependencies
# (python-iptables has a small C extension, hence the compiler). Stage 2 is a
# slim Debian with the runtime packages and a virtual environment installed
# from those wheels only, by image/install.sh (the same script CI runs:
# tests/test_image.py). No compiler, no pip, no setuid binaries in the result.
# It runs as root with only NET_ADMIN and NET_RAW (see k8s/daemonset.yaml):
# netfilter and netlink need them, so a non-root user is not an option.

ARG DEBIAN_IMAGE=debian:bookworm-slim

FROM ${DEBIAN_IMAGE} AS builder
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY metaleg ./metaleg
RUN /opt/build/bin/pip wheel --no-cache-dir --disable-pip-version-check --use-pep517 --wheel-dir /wheels .

FROM ${DEBIAN_IMAGE}
LABEL org.opencontainers.image.title="metaleg-agent" \
      org.opencontainers.image.description="Egress from a Service's MetalLB (L2) LoadBalancer IP" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/metaleg/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# install.sh apt-installs iptables, ipset, nftables, libnftables1, iproute2,
# conntrack, kmod, python3 and python3-venv, then the wheels into /opt/metaleg.
# Afterwards: no venv tooling, no apt lists, no setuid/setgid bits.
RUN --mount=type=bind,source=image/install.sh,target=/tmp/install.sh \
    --mount=type=bind,from=builder,source=/wheels,target=/tmp/wheels \
    PIP_NO_CACHE_DIR=1 sh /tmp/install.sh --prefix /opt/metaleg --wheel-dir /tmp/wheels --offline --slim \
    && DEBIAN_FRONTEND=noninteractive apt-get purge -y --auto-remove python3-venv python3.11-venv \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
    && find / -xdev -type f -perm /6000 -exec chmod a-s {} + \
    && metaleg-supervisor --help >/dev/null
ENTRYPOINT ["metaleg-supervisor"]
CMD ["run"]
