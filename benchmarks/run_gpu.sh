#!/usr/bin/env bash
# The GPU checks and benchmarks, on a machine with one CUDA GPU and its own torch/triton:
#   bash benchmarks/run_gpu.sh tests kernels ring train
#     tests    kernel, op and ring tests natively on the GPU (pytest, 8 workers, verbose: a run stopped at its
#              time limit still names every test that finished)
#     kernels  benchmarks/moe_gpu.py (MOE_GPU_ARGS, default: every shape)
#     ring     benchmarks/ring_gpu.py (RING_GPU_ARGS)
#     train    1-rank NCCL training of small-moe with the Triton kernels (moesys_compile.train)
# Logs and JSON go to $OUT (benchmarks/results/gpu when OUT is unset). Each stage has a time limit
# (TESTS_LIMIT 400 s, KERNELS_LIMIT 300, RING_LIMIT 200, TRAIN_LIMIT 150): on a fresh machine most of
# it goes to compiling and tuning the Triton kernels, so give a stage its own call where one call is
# capped (the whole kernels table took more than 240 s for three of its four shapes at one T).
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
  || { echo "pip install -e . failed: see $OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv
python3 -c "import torch, triton, moesys_compile; print('torch', torch.__version__, 'triton', triton.__version__)"
for stage in "$@"; do
  case "$stage" in
    tests)
      # 2 intra-op threads per worker: by default each of the 8 workers would take all 16 cores
      OMP_NUM_THREADS="${TEST_THREADS:-2}" timeout "${TESTS_LIMIT:-400}" python3 -m pytest -v -p no:cacheprovider \
        -n "${TEST_WORKERS:-8}" --timeout 120 -rfE --tb=short \
        ${TEST_FILES:-tests/test_kernels_grouped_mlp.py tests/test_kernels_permute.py tests/test_kernels_routing.py \
        tests/test_kernels_lower.py tests/test_ring_program.py tests/test_ops.py tests/test_token_exchange.py tests/test_kernels_shapes.py} >"$OUT/tests_gpu.log" 2>&1
      echo "tests: exit $?"; grep -E " passed| failed|FAILED|ERROR|Timeout" "$OUT/tests_gpu.log" | cut -c1-300 | tail -25 ;;
    kernels)
      timeout "${KERNELS_LIMIT:-300}" python3 -m benchmarks.moe_gpu --json "$OUT/moe_gpu.json" ${MOE_GPU_ARGS:-} \
        >"$OUT/moe_gpu.log" 2>&1
      echo "kernels: exit $?"; grep -v "^ \|^Traceback" "$OUT/moe_gpu.log" | tail -60 ;;
    ring)
      timeout "${RING_LIMIT:-200}" python3 -m benchmarks.ring_gpu --json "$OUT/ring_gpu.json" ${RING_GPU_ARGS:-} \
        >"$OUT/ring_gpu.log" 2>&1
      echo "ring: exit $?"; tail -30 "$OUT/ring_gpu.log" ;;
    train)
      timeout "${TRAIN_LIMIT:-150}" torchrun --standalone --nproc-per-node 1 -m moesys_compile.train --device cuda \
        --model small-moe --steps 40 --batch-size 16 --seq-len 256 --log-every 10 --ckpt-dir "$OUT/ckpt" \
        --log-json "$OUT/train_cuda.json" >"$OUT/train_cuda.log" 2>&1
      echo "train: exit $?"; tail -15 "$OUT/train_cuda.log"; rm -rf "$OUT/ckpt" ;;
  esac
done
