# The image the Kubernetes and Docker deployments run (deployments/kubernetes.yaml, docker.yaml).
#
# TensorFlow's own GPU image of the version tnflow pins brings CUDA, cuDNN and a TensorFlow
# built against them. The rest of tnflow's dependencies (no dev extras, but the mlflow and
# optuna ones, so a sweep's trials on the pool log to MLflow and report to their study) come at
# the versions of uv.lock, the ones CI tested, checked against the lock's hashes; the lock's
# TensorFlow is the image's, so it stays. Then tnflow itself, without resolving anything again.
# The repository lands in /opt/tnflow, where the deployments' flows run from. Build and push
# it to a registry your cluster pulls from:
#
#   docker build -t registry.example.com/tnflow:latest . && docker push registry.example.com/tnflow:latest
FROM tensorflow/tensorflow:2.21.0-gpu

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TNFLOW_CACHE_DIR=/shared/tnflow/cache \
    TNFLOW_OUTPUT_DIR=/shared/tnflow/runs

WORKDIR /opt/tnflow
COPY pyproject.toml uv.lock README.md ./
COPY flows ./flows
COPY tasks ./tasks
COPY deployments ./deployments
RUN pip install uv \
    && uv export --frozen --no-emit-project --no-dev --extra mlflow --extra optuna -o /tmp/requirements.txt \
    && uv pip install --system --require-hashes -r /tmp/requirements.txt \
    && uv pip install --system --no-deps . \
    && rm /tmp/requirements.txt \
    && useradd --create-home --uid 1000 --shell /usr/sbin/nologin tnflow

# Not root: a flow run reads downloaded archives and user pictures (README: hostile input).
USER tnflow
