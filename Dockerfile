# Sluice gateway and stage workers (one image, the command picks the role).
FROM python:3.11-slim

# torch comes first from a CPU-only index: resolved through the project, pip would pull the
# CUDA build (gigabytes). Point it at a mirror with --build-arg TORCH_INDEX_URL=...
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # The embedding model ships inside a pip package; never reach for the Hub at runtime.
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    SLUICE_DATA_DIR=/data

# OCR of scans and images (the parse stage): Tesseract runs in process from the tesserocr
# wheel; its English model is Debian's.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tesseract-ocr-eng \
    && rm -rf /var/lib/apt/lists/*

RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY contracts ./contracts
COPY gateway ./gateway
COPY stages ./stages
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /app sluice \
    && mkdir -p /data && chown sluice:sluice /data

USER sluice
VOLUME ["/data"]
EXPOSE 8000
CMD ["sluice", "gateway"]
