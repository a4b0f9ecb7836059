#!/usr/bin/env bash
# The first thing to run on a GPU machine (about 10 minutes on one 8-GPU node):
#   bash jobs/gpu_smoke.sh
# 1. versions of CUDA / TE / megatron-core / DeepSpeed / DALI (stops here, exit 0, without a GPU)
# 2. the gpu-marked tests; 3. TE's attention backend for packed THD (must be fused);
# 4. 3-step trainings: bf16 + TE + ZeRO-1, TP = 2, PP = 2 (with 2+ GPUs), FP8 delayed/tensorwise;
# 5. two Dream-7B-shape layers at s = 3072: step time and peak memory.
set -euo pipefail
cd "$(dirname "$0")/.."
run() { echo; echo "== $*"; "$@"; }

status=0
run python -m omnidiff.platform.gpu_smoke versions || status=$?
if [ "$status" -eq 3 ]; then exit 0; fi
if [ "$status" -ne 0 ]; then exit "$status"; fi
gpus=$(python -c "import torch; print(torch.cuda.device_count())")

run python -m pytest -q -m gpu tests
run env NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=1 python -m omnidiff.platform.gpu_smoke backend

out=$(mktemp -d)
tiny=(jobs/configs/tiny.yaml schedule.train_steps=3 logging.progress_bar=false logging.log_interval=1
      parallel.precision=bf16 parallel.transformer_engine=true parallel.zero_stage=1)
run omnidiff train "${tiny[@]}" output_dir="$out/bf16"
if [ "$gpus" -ge 2 ]; then
  run omnidiff train "${tiny[@]}" output_dir="$out/tp2" parallel.nproc_per_node=2 \
      parallel.tensor_parallel=2 parallel.sequence_parallel=true
  run omnidiff train "${tiny[@]}" output_dir="$out/pp2" parallel.nproc_per_node=2 \
      parallel.pipeline_parallel=2
fi
fp8=(model.hidden_size=256 model.ffn_hidden_size=512 model.num_attention_heads=4
     model.num_query_groups=2 parallel.fp8=hybrid)
for recipe in delayed tensorwise; do
  run omnidiff train "${tiny[@]}" "${fp8[@]}" parallel.fp8_recipe=$recipe output_dir="$out/fp8-$recipe"
done
run python -m omnidiff.platform.gpu_smoke shape
echo; echo "GPU smoke checks passed; outputs in $out"
