#!/usr/bin/env bash
# What this project measures on the lent GPU machine, in calls of the device tool:
#   run(command="bash bench/gpu_run.sh hook copy decode", carry=[".whl"])
# Steps (any subset, in the order given; the whole set does not fit one 10-minute call):
#   hook       bench/hook_overhead.py on CUDA (under sync_debug_mode "error") and on the host CPU
#   graph      bench/graph_counting.py: counting inside a replayed CUDA graph (exact across an eager
#              prefill-sized call; in-place map switch seen by replays; GPU cost per step, 58 layers)
#   sglang     tests/engines/sglang_gpu_check.py: SGLang's own metadata, dispatch and recorder on the GPU;
#              a captured CUDA graph routes and counts by the maps the adapter switched in place
#              (needs the SGLang wheels below in .whl)
#   agreement  bench/agreement.py, 4x4 and 16x8 sidecars x workers, node and per-worker path (~6 min)
#   agreement-procs  the same at 16x8 with a process per worker, as engines run (over 7 min on 16 cores)
#   copy       bench/copy_gpu.py: the copy engine against the NCCL P2P ceiling (ring, and all-pairs on > 2 GPUs), every visible GPU
#   decode     bench/decode_gpu.py: the decode loop in four modes, policy deepseek, every visible GPU
#   decode-stable  the same with the stable policy (the sidecar's default)
# .whl/ holds the wheels for Python 3.12 that machine lacks (it has torch, msgpack and uvloop):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl pyzmq==27.3.0 prometheus-client==0.26.0 h11==0.16.0
#   and for the sglang step (add --platform manylinux_2_34_x86_64 --platform manylinux_2_17_x86_64):
#     sglang==0.5.23 orjson==3.13.0 msgspec==0.23.0 einops==0.8.2 pybase64==1.5.1 psutil==7.2.2 \
#     pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.8.0 typing-inspection==0.4.5
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
for step in "$@"; do
    case "$step" in
        hook)
            python3 bench/hook_overhead.py --device cuda --check-sync | tee "$OUT/hook_overhead_cuda.txt"
            python3 bench/hook_overhead.py --device cpu | tee "$OUT/hook_overhead_cpu.txt" ;;
        graph)
            python3 bench/graph_counting.py 2>&1 | tee "$OUT/graph_counting.txt" ;;
        sglang)
            timeout 300 python3 tests/engines/sglang_gpu_check.py 2>&1 | tee "$OUT/sglang_gpu_check.txt" ;;
        agreement)
            timeout 540 python3 bench/agreement.py --configs 4x4 16x8 --epochs 30 2>&1 | tee "$OUT/agreement.txt" ;;
        agreement-procs)
            # One process per worker, as engines run (one rank per process): 128 + 16 processes.
            timeout 540 python3 bench/agreement.py --configs 16x8 --epochs 20 --hooks-per-process 1 2>&1 | tee "$OUT/agreement_proc_per_worker.txt" ;;
        copy)
            timeout 300 python3 bench/copy_gpu.py --repeats 5 2>&1 | grep -v -i warn | tee "$OUT/copy_gpu.txt" ;;
        decode)
            # About 9 GB per GPU, 2-3 minutes on 2 GPUs; table in decode_gpu.md, raw step times in .json.
            timeout 400 python3 bench/decode_gpu.py --out "$OUT/decode_gpu.md" 2>&1 | grep -v -i warn | tee "$OUT/decode_gpu.txt" ;;
        decode-stable)
            timeout 400 python3 bench/decode_gpu.py --policy stable --out "$OUT/decode_gpu_stable.md" 2>&1 | grep -v -i warn | tee "$OUT/decode_gpu_stable.txt" ;;
        *) echo "unknown step $step (hook, graph, sglang, agreement, agreement-procs, copy, decode, decode-stable)" >&2; exit 2 ;;
    esac
done
