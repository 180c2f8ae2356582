#!/usr/bin/env bash
# Issue 19 on a machine with GPUs, in ONE call of at most 8 minutes: the Ray path with one detector actor per GPU
# measured against the single process (benchmarks/bench_ray.py, batch 256, GPU decode by DALI and by nvJPEG),
# and the GPU fault test (one GPU actor killed mid-run: every image once, the single-process detections).
# Everything lands in $OUT.
#
#   bash benchmarks/ray_gpu_session.sh ONNX VOC2007_DIR [FAULT_ONNX]
#
# ONNX: the converted file to measure (the InceptionV2 stand-in, core FP16); FAULT_ONNX: the file of the fault
# test (default ONNX). Run from the repository root with PYTHONPATH holding ray, onnxruntime-gpu (and DALI);
# no TensorFlow is needed. $OUT defaults to ./ray_gpu_out; $PYTHON to python3; $IMAGES (default 20000) is the
# benchmark's image count (a few hundred for a dry run of this script on a machine without GPUs); $GPUS the
# actor counts (default 1,2 and 4 up to the GPUs there).
set -uo pipefail
onnx=${1:?usage: ray_gpu_session.sh ONNX VOC2007_DIR [FAULT_ONNX]}
voc=${2:?usage: ray_gpu_session.sh ONNX VOC2007_DIR [FAULT_ONNX]}
fault_onnx=${3:-$onnx}
out=${OUT:-ray_gpu_out}
python=${PYTHON:-python3}
images=${IMAGES:-20000}
gpus_here=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
default_gpus=1; [ "$gpus_here" -ge 2 ] && default_gpus=1,2; [ "$gpus_here" -ge 4 ] && default_gpus=1,2,4
gpus=${GPUS:-$default_gpus}
mkdir -p "$out"
ws=$(mktemp -d /tmp/ray-gpu-ws.XXXXXX)
start=$SECONDS
step() { echo "== $(date -u +%H:%M:%S) +$((SECONDS - start)) s: $*" | tee -a "$out/session.log"; }

step "machine"
{ nvidia-smi -L; nproc; "$python" -c 'import sys, ray, onnxruntime as ort
print(sys.version.split()[0], "ray", ray.__version__, "onnxruntime", ort.__version__, ort.get_available_providers())
try:
    import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.device_count())
except ImportError:
    print("torch not installed")
try:
    import nvidia.dali as dali; print("dali", dali.__version__)
except ImportError:
    print("dali not installed")'; } > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

bench() {   # name, timeout, extra bench_ray options
  local name=$1 limit=$2; shift 2
  step "bench_ray $name ($*), at most $limit s"
  timeout "$limit" "$python" -m benchmarks.bench_ray --onnx "$onnx" -d "$voc" -w "$ws" --images "$images" -b 256 \
      --gpus "$gpus" --repeats 2 --out "$out/bench_ray_$name.json" "$@" > "$out/bench_ray_$name.log" 2>&1
  local code=$?
  tail -n 8 "$out/bench_ray_$name.log"
  echo "exit $code" | tee -a "$out/session.log"
  return $code
}

# 1. GPU decode in the single process and in each actor, CUDA graph + NHWC: DALI, then nvJPEG (torchvision).
SSD_GPU_DECODER=dali bench dali 170 --decode gpu --cuda-graph --nhwc
SSD_GPU_DECODER=nvjpeg bench nvjpeg 150 --decode gpu --cuda-graph --nhwc

# 2. The GPU fault test (pytest, marked gpu): one actor SIGKILLed mid-run (with one GPU, Ray restarts it there).
if [ "$gpus_here" -ge 1 ]; then
  step "GPU fault test, at most 120 s"
  SSD_RAY_ONNX=$fault_onnx SSD_RAY_VOC=$voc SSD_RAY_REPORT="$out/fault_gpu.json" timeout 120 "$python" -m pytest \
      tests/test_faults.py -m gpu -k ray_gpu_actor_killed -q -p no:cacheprovider -rA --junitxml="$out/fault_gpu.xml" \
      > "$out/fault_gpu.log" 2>&1
  echo "exit $?" | tee -a "$out/session.log"
  tail -n 15 "$out/fault_gpu.log"
fi

rm -rf "$ws"
step "done"
