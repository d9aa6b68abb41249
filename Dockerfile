# lightbsr on the official Ray GPU image (Ray and Python versions equal pyproject.toml's pins).
#   docker build -t ghcr.io/lightbsr/lightbsr:0.1.0-ray2.60.0-py311-gpu .
# The same tag is named in cluster/aws.yaml and cluster/kuberay/*.yaml (a test checks).
# No credentials go into the image: S3 keys and the MLflow URI come from the cluster at run time.
FROM docker.io/rayproject/ray:2.60.0-py311-gpu

# The base image's non-root user (uid 1000, gid 100 "users"); everything below runs as it.
USER ray
WORKDIR /home/ray/lightbsr

ENV PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    RAY_DATA_DISABLE_PROGRESS_BARS=1 \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false \
    TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1

# Dependencies first, in their own layer: code edits do not re-download torch.
# On this image pip takes torch 2.13.0's default Linux build, which bundles its CUDA libraries.
COPY --chown=ray:users pyproject.toml README.md ./
RUN mkdir -p lightbsr workflows \
    && touch lightbsr/__init__.py workflows/__init__.py \
    && pip install --no-cache-dir . \
    && pip uninstall -y lightbsr

COPY --chown=ray:users lightbsr ./lightbsr
COPY --chown=ray:users workflows ./workflows
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import ray, torch, lightbsr, workflows.pipeline; \
                  assert ray.__version__ == '2.60.0', ray.__version__"

# `python -m workflows.pipeline --config /home/ray/lightbsr/workflows/configs/<name>.yaml` runs a job;
# KubeRay and the cluster launcher start Ray themselves, so the image keeps the base entrypoint.
