# peftserve on GPUs: CUDA runtime, non-root, the project installed, Serve started from a config.
#   docker build -t peftserve .
#   docker run --gpus all -p 8000:8000 -e PEFTSERVE_ADMIN_TOKEN=... -v /mnt/peftserve:/mnt/peftserve peftserve  # 4 x A10, XL
#   docker run -p 8000:8000 peftserve serve run deploy/local.yaml                         # CPU, tiny base
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PEFTSERVE_HOME=/home/peftserve/.cache/peftserve \
    RAY_USAGE_STATS_ENABLED=0

# Ubuntu point releases replace package versions; the base image tag is what pins them.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 peftserve

WORKDIR /app
RUN python3.11 -m venv /opt/venv && chown -R peftserve:peftserve /app /opt/venv
ENV PATH=/opt/venv/bin:$PATH

USER 1000:1000
COPY --chown=peftserve:peftserve pyproject.toml README.md ./
COPY --chown=peftserve:peftserve serve ./serve
COPY --chown=peftserve:peftserve adapters ./adapters
COPY --chown=peftserve:peftserve training ./training
COPY --chown=peftserve:peftserve loadtests ./loadtests
COPY --chown=peftserve:peftserve deploy ./deploy
# PyPI's Linux torch wheel is the CUDA build and brings its own CUDA libraries; the image supplies the driver.
RUN pip install --upgrade pip==25.3 \
    && pip install torch==2.13.0 \
    && pip install .

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8000/health"]
# `serve run` starts a local Ray head and deploys the app from the config (exec form: SIGTERM reaches it).
# In the config, http_options.host must be 0.0.0.0 for -p to reach the server (the XL config has it).
CMD ["serve", "run", "deploy/flan-t5-xl-4xa10.yaml"]
