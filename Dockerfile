# spoa-mirror container image.
#
#   docker build -t spoa-mirror .
#   docker run -p 12345:12345 -p 9180:9180 -v "$PWD/my-config.yaml:/etc/spoa-mirror/config.yaml:ro" spoa-mirror
#   docker run -p 12345:12345 spoa-mirror --config /etc/spoa-mirror/config.yaml -u http://shadow:8080
#
# The built-in config (deploy/docker/config.yaml) listens on all interfaces and names no target:
# mount your own over /etc/spoa-mirror/config.yaml, or give targets with -u.
#
# Works with BuildKit and with the legacy builder (no RUN --mount). Offline builds: put the wheels
# of the project and its dependencies (`pip wheel --wheel-dir wheelhouse .`) in wheelhouse/ of the
# build context, and, if the registry is out of reach, name a local base with Python 3.11 and venv
# as `--build-arg BASE=...`; tests/test_container.py builds it so, from a debootstrapped bookworm.

# python:3.11-slim, pinned: a tag can move under a rebuild, a digest cannot.
ARG BASE=python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

# Stage 1: the agent installed in a virtualenv, from wheelhouse/ when it holds wheels, otherwise from
# wheels built here. No build tool, source tree or pip cache reaches the final image.
FROM ${BASE} AS build
WORKDIR /src
# `wheelhouse*` may match nothing: COPY then takes the files it does match.
COPY pyproject.toml README.md LICENSE wheelhouse* ./
COPY spoe ./spoe
COPY spoa_mirror ./spoa_mirror
RUN set -e; \
    python3 -m venv /opt/spoa-mirror; \
    if ls ./*.whl >/dev/null 2>&1; then wheels=/src; \
    else wheels=/wheels; /opt/spoa-mirror/bin/pip wheel --no-cache-dir --wheel-dir /wheels .; fi; \
    /opt/spoa-mirror/bin/pip install --no-cache-dir --no-index --find-links "$wheels" spoa-mirror; \
    /opt/spoa-mirror/bin/pip uninstall -y -q pip

FROM ${BASE}
# No .pyc written at run time (the root filesystem may be read-only); logs unbuffered, so they
# reach `docker logs` as they happen.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/spoa-mirror/bin:$PATH
COPY --from=build /opt/spoa-mirror /opt/spoa-mirror
# A fixed, unprivileged uid (10001, outside the range of distribution users) that Kubernetes'
# runAsUser can name; the agent needs no privilege (its ports are above 1024) and writes no file.
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin spoa-mirror
COPY deploy/docker/config.yaml /etc/spoa-mirror/config.yaml
USER 10001:10001
# SPOP (HAProxy's agents' backend) and the admin listener (/metrics, /livez, /healthz, /readyz).
EXPOSE 12345 9180
# No curl in the image: the agent's interpreter does the check. urlopen raises, and the command
# exits 1, on anything but a 2xx answer; /healthz fails when the event loop is stuck.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9180/healthz', timeout=2)"]
# SIGTERM (docker stop): the agent disconnects from HAProxy and drains for drain_timeout (5 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["spoa-mirror"]
CMD ["--config", "/etc/spoa-mirror/config.yaml"]
