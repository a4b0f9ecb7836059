# GPU training image (and the MLflow server's, see k8s/services.py). NGC's PyTorch container
# ships a CUDA build of torch with matching Transformer Engine (FP8), apex fused kernels and
# NCCL: the GPU-only parts of omnidiff. The rest installs from PyPI as on a CPU machine; the
# base image's torch satisfies the torch requirement, so pip keeps it.
#   docker build -t registry.example.com/omnidiff/omnidiff:0.1.0 .
# Every node of a Kubernetes job runs `omnidiff launch -- train /etc/omnidiff/run.yaml`.
FROM nvcr.io/nvidia/pytorch:25.11-py3

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# espeak-ng: real synthesised speech for the demo dataset.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends espeak-ng \
    && rm -rf /var/lib/apt/lists/*

# The stack above torch, pinned as setup.py and REFERENCE §7 state it. The base image's own
# DALI build is replaced by the CUDA 12 wheel the data path is tested with.
RUN pip uninstall --yes nvidia-dali-cuda130 nvidia-dali-cuda120 \
    && pip install \
        "megatron-core==0.16.1" \
        "deepspeed>=0.19,<0.20" \
        "nvidia-dali-cuda120>=2.4,<2.5" \
        "mlflow[auth,db]>=3.17,<3.18"

# Editable, as on a developer machine: the package data (demo speech, job files) stays in place.
WORKDIR /opt/omnidiff
COPY . .
RUN pip install --editable . \
    && useradd --no-log-init --create-home --uid 10001 --user-group omnidiff

# The uid the Kubernetes manifests run as (cluster.run_as_user); never root.
USER 10001:10001
WORKDIR /home/omnidiff

ENTRYPOINT ["omnidiff"]
CMD ["--help"]
