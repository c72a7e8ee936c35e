#!/usr/bin/env bash
# Everything this project measures on the lent GPU machine, in one call of the device tool:
#   run(command="bash bench/gpu_run.sh", carry=[".whl"])
# .whl/ holds the pyzmq wheel for Python 3.12 (that machine has torch, msgpack and uvloop, not pyzmq):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl pyzmq==27.3.0
# Results land in $OUT (and on stdout); commit them under bench/results/ with the card's name.
set -euo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD"
OUT=${OUT:-/tmp/eplb-out}
mkdir -p "$OUT"
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import torch, zmq, uvloop, msgpack; print("torch", torch.__version__, "pyzmq", zmq.__version__, "uvloop", uvloop.__version__, "msgpack", msgpack.version, "cpus", __import__("os").cpu_count())'
} | tee "$OUT/machine.txt"
python3 bench/hook_overhead.py --device cuda --check-sync | tee "$OUT/hook_overhead_cuda.txt"
python3 bench/hook_overhead.py --device cpu | tee "$OUT/hook_overhead_cpu.txt"
timeout 420 python3 bench/agreement.py --configs 2x2 4x4 8x8 16x8 --epochs 30 2>&1 | tee "$OUT/agreement.txt"
# One process per worker, as engines run (one rank per process): 128 + 16 processes.
timeout 420 python3 bench/agreement.py --configs 16x8 --epochs 50 --hooks-per-process 1 2>&1 | tee "$OUT/agreement_proc_per_worker.txt"

# --- Issue 5: decode-loop step times while experts move (bench/decode_gpu.py) -------------------
# Every visible GPU, one process each; four modes in one call: no rebalance, stop-the-world,
# in-engine async, sidecar (a real eplb-sidecar). About 10 GB per GPU, 2-4 minutes on 2 GPUs.
# Table: $OUT/decode_gpu.md (+ .json with the raw step times); commit as bench/results/<card>x<N>_decode.md.
timeout 580 python3 bench/decode_gpu.py --out "$OUT/decode_gpu.md" 2>&1 | tee "$OUT/decode_gpu.txt"
