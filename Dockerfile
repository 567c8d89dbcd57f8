# The model_loader storage initializer for KServe (docs/kubernetes.md): an init container
# that takes `<src_uri> <dest_path>` pairs and fetches each model through model_loader's cache.
#
#   docker build -t registry.example.com/model-loader-initializer:0.1.0 .
#   docker run --rm -e MLFLOW_TRACKING_URI=https://mlflow.internal \
#     -v "$PWD/models:/mnt/models" registry.example.com/model-loader-initializer:0.1.0 \
#     models:/fraud@champion /mnt/models
#
# Keep .venv and other large directories out of the build context (.dockerignore).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the wheel is built from: the package and the files pyproject.toml names.
COPY pyproject.toml README.md /build/model-loader/
COPY src /build/model-loader/src
RUN pip install "/build/model-loader[all]" && rm -rf /build

# UID 1000 like KServe's own initializer; group 0 may write too, for platforms that run
# containers under an arbitrary UID in group 0 (OpenShift). The cache directory is where a
# node-local or shared volume is mounted; without one, the cache lives and dies with the
# container (a copy into the destination, no warm start, no last-known-good).
RUN useradd --uid 1000 --gid 0 --create-home --home-dir /home/model-loader model-loader \
    && mkdir -p /var/cache/model-loader /mnt/models \
    && chown 1000:0 /var/cache/model-loader /mnt/models \
    && chmod 0775 /var/cache/model-loader /mnt/models

ENV MODEL_LOADER_CACHE_DIR=/var/cache/model-loader
USER 1000
WORKDIR /home/model-loader

# KServe passes the pairs as the container's args, appended to this entrypoint.
ENTRYPOINT ["python", "-m", "model_loader.kserve"]
