# syntax=docker/dockerfile:1
# dreamserve, CPU image: `dreamserve serve` by default, `dreamserve worker` as compose.yaml runs
# it. The package with its `server` and `s3` extras at the exact versions of constraints.txt; no
# torch (the GPU image is built differently: docs/deploy.md "GPU workers").

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
RUN python -m venv /opt/dreamserve \
 && /opt/dreamserve/bin/pip install -c constraints.txt '.[server,s3]' \
 && /opt/dreamserve/bin/pip check \
 && if /opt/dreamserve/bin/pip show torch >/dev/null 2>&1; then \
      echo 'torch in the CPU image: a dependency pulled it in' >&2; exit 1; fi

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PATH=/opt/dreamserve/bin:$PATH \
    DREAMSERVE_DATA_DIR=/var/lib/dreamserve \
    DREAMSERVE_HOST=0.0.0.0 \
    DREAMSERVE_PORT=8000
# The data dir exists in the image, owned by the user, so that a new named volume mounted on it
# starts owned by that user too (the keys are made there on first start).
RUN groupadd --system --gid 10001 dreamserve \
 && useradd --system --uid 10001 --gid dreamserve --home-dir /var/lib/dreamserve \
      --no-create-home --shell /usr/sbin/nologin dreamserve \
 && install -d -o dreamserve -g dreamserve -m 0700 /var/lib/dreamserve
COPY --from=build /opt/dreamserve /opt/dreamserve
USER dreamserve
WORKDIR /var/lib/dreamserve
EXPOSE 8000
VOLUME /var/lib/dreamserve
# /healthz: the process answers (no token; left out of the access log). The image has no curl:
# the venv's python asks. A `dreamserve worker` container serves no HTTP: compose.yaml turns the
# check off there.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('DREAMSERVE_PORT', '8000') + '/healthz', timeout=4)"]
CMD ["dreamserve", "serve"]
