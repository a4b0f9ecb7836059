# GPU training image. NGC's PyTorch container ships a CUDA build of torch with matching
# Transformer Engine (FP8), apex fused kernels and NCCL: the GPU-only parts of omnidiff.
# Everything else installs from PyPI exactly as on a CPU machine.
FROM nvcr.io/nvidia/pytorch:25.11-py3

ENV PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=8

# espeak-ng: real synthesised speech for the demo dataset.
RUN apt-get update \
    && apt-get install -y --no-install-recommends espeak-ng \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/omnidiff
COPY . .
# The base image's torch satisfies the torch requirement, so pip keeps it.
RUN pip install --no-cache-dir -e ".[test]"

ENTRYPOINT ["omnidiff"]
CMD ["--help"]
