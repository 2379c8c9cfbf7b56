# spoa-mirror container image.
#
#   docker build -t spoa-mirror .
#   docker run -p 12345:12345 -p 9180:9180 -v "$PWD/my-config.yaml:/etc/spoa-mirror/config.yaml:ro" spoa-mirror
#   docker run -p 12345:12345 spoa-mirror --config /etc/spoa-mirror/config.yaml -u http://shadow:8080
#
# The built-in config (deploy/docker/config.yaml) listens on all interfaces and names no target:
# mount your own over /etc/spoa-mirror/config.yaml, or give targets with -u.

# Stage 1: wheels for the project and its dependencies, so that no build tool, source tree or pip
# cache reaches the final image.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY spoe ./spoe
COPY spoa_mirror ./spoa_mirror
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
# No .pyc written at run time (the root filesystem may be read-only); logs unbuffered, so they
# reach `docker logs` as they happen.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The wheels are mounted for this one step, not copied, so they add nothing to the image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index /wheels/*.whl
# A fixed, unprivileged uid (10001, outside the range of distribution users) that Kubernetes'
# runAsUser can name; the agent needs no privilege (its ports are above 1024) and writes no file.
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin spoa-mirror
COPY deploy/docker/config.yaml /etc/spoa-mirror/config.yaml
USER 10001:10001
# SPOP (HAProxy's agents' backend) and the admin listener (/metrics, /healthz, /readyz).
EXPOSE 12345 9180
# slim has no curl: the interpreter that runs the agent does the check. urlopen raises, and the
# command exits 1, on anything but a 2xx answer.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9180/healthz', timeout=2)"]
ENTRYPOINT ["spoa-mirror"]
CMD ["--config", "/etc/spoa-mirror/config.yaml"]
