# syntax=docker/dockerfile:1
# mailrelay in a container. Build and run (see README.md, "Deployment"):
#
#   docker build -t mailrelay .
#   docker run -d --name relay -p 25:25 -p 127.0.0.1:8025:8025 \
#       -e MAILRELAY_DOMAIN=mail.example.com -e MAILRELAY_RELAY_NETWORKS=192.168.0.0/16 \
#       -v relay-spool:/var/lib/mailrelay/spool -v relay-mail:/var/lib/mailrelay/mail mailrelay
#
# The relay runs as the unprivileged user "mailrelay" and still listens on ports 25, 587 and 110:
# Docker lets any user of a container bind low ports (net.ipv4.ip_unprivileged_port_start=0 in
# the container's network namespace). Where a runtime does not, give it that sysctl or map
# ports: MAILRELAY_SMTP_PORT=2525 and -p 25:2525.

# ---------------------------------------------------------------- build
FROM python:3.11-slim AS build
# A C compiler for the example so: filters; Python packages come as wheels. Debian's packages are
# not pinned (DL3008): the base image's release pins them, and security updates must get in.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core/ core/
COPY plugins/ plugins/
COPY sdk/ sdk/
COPY filters_c/ filters_c/
RUN python -m venv /opt/mailrelay \
    && /opt/mailrelay/bin/pip install --no-cache-dir --disable-pip-version-check '.[speed]'
RUN make -C filters_c OUT=/opt/mailrelay/lib/filters

# ---------------------------------------------------------------- run
FROM python:3.11-slim
# tini is PID 1: it passes SIGTERM on and reaps processes that filters leave behind.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10025 mailrelay \
    && useradd --system --uid 10025 --gid mailrelay --home-dir /var/lib/mailrelay --shell /usr/sbin/nologin mailrelay \
    && install -d -o mailrelay -g mailrelay -m 0750 /var/lib/mailrelay /var/lib/mailrelay/spool /var/lib/mailrelay/mail
COPY --from=build /opt/mailrelay /opt/mailrelay
COPY deploy/docker/relay.conf /etc/mailrelay/relay.conf
ENV PATH=/opt/mailrelay/bin:$PATH \
    MAILRELAY_CONFIG=/etc/mailrelay/relay.conf \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# The spool (queued mail) and the mailboxes that deliver: and copy: filters fill.
VOLUME ["/var/lib/mailrelay/spool", "/var/lib/mailrelay/mail"]
# SMTP, submission, POP3, POP3S, and the admin server (HTTP: /healthz, /readyz, UI, API).
EXPOSE 25 587 110 995 8025
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10025:10025
WORKDIR /var/lib/mailrelay
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MAILRELAY_ADMIN_PORT', '8025'), timeout=4)"]
ENTRYPOINT ["/usr/bin/tini", "--"]
# In the foreground (the container's life is the relay's); the configuration is $MAILRELAY_CONFIG.
CMD ["relay", "--no-daemon"]
