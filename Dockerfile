# modelserve: a builder stage makes the virtualenv and trains the example models; the runtime
# stage copies only those two folders.
#   docker build -t modelserve .
# BASE is any Debian bookworm image with python3 (3.11) and its venv module; deploy/smoke-image.sh
# passes one it builds with debootstrap where no registry can be reached. Both stages use the
# same BASE, so the venv's interpreter path matches.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /src
# Dependencies get their own layer, so a change to the source does not download them again.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && pip install --quiet -c constraints.txt -r requirements.txt
COPY README.md ./
COPY service ./service
COPY training ./training
COPY models ./models
RUN pip install --quiet --no-deps . \
    && python -m training --model-repository /src/models

FROM ${BASE} AS runtime
LABEL org.opencontainers.image.title="modelserve" \
      org.opencontainers.image.description="Model server for scikit-learn and ONNX models (Open Inference Protocol V2 and V1)" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /src/models /models
# Nothing is written outside /tmp, so the image runs with a read-only root filesystem.
# HOME points there too because UID 10001 has no passwd entry.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MODELSERVE_MODEL_REPOSITORY=/models \
    MODELSERVE_HOST=0.0.0.0 \
    MODELSERVE_PORT=8000 \
    MODELSERVE_LOG_FORMAT=json \
    MODELSERVE_JOBS_DIR=/tmp/modelserve-jobs
USER 10001:10001
WORKDIR /tmp
# HTTP, and gRPC (Open Inference Protocol): MODELSERVE_GRPC_PORT=0 turns it off.
EXPOSE 8000 8001
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('MODELSERVE_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["modelserve"]
CMD ["serve"]
