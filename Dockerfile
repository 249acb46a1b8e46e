# The anchor server. `docker-compose up --build`, then http://127.0.0.1:8000
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HPI_DATA_DIR=/data

# torch first, pinned, in its own layer: it is the big download and changes least.
# A CPU-only image: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_URL=""
RUN pip install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

# A C compiler for the anchor's CPU kernels (server/_kernels.c), built by pip install.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# The same install as the README's and tests/test_package.py's: the hpi wheel built from the
# source (it carries the page and the shaders), then the default model; the source is not kept.
COPY . /src
RUN PYTHON=python bash /src/scripts/install.sh && rm -rf /src

RUN useradd --system --create-home hpi && mkdir -p /data && chown hpi /data
USER hpi
VOLUME ["/data"]

EXPOSE 8000
CMD ["hpi", "serve", "--host", "0.0.0.0", "--port", "8000"]
