# SimMerge service: REST API + merge workers on a CUDA-capable PyTorch image.
# Build: docker build -t simmerge .   Run: docker run --gpus all -p 8000:8000 -v simmerge:/data simmerge
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SIMMERGE_HOME=/data \
    SIMMERGE_MERGE_DEVICE=auto \
    NUMBA_CACHE_DIR=/home/simmerge/.cache/numba

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin simmerge \
    && mkdir -p /data \
    && chown simmerge:simmerge /data

WORKDIR /opt/simmerge
COPY pyproject.toml README.md ./
COPY simmerge ./simmerge
COPY features ./features
COPY models ./models
COPY service ./service
# The image's CUDA torch satisfies `torch>=2.2`, so pip keeps it rather than fetching a CPU build.
# DL3013: "." is this project; its dependencies are bounded in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[postgres]"

USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["simmerge", "serve", "--host", "0.0.0.0", "--port", "8000"]
