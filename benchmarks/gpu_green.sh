#!/usr/bin/env bash
# There (the GPU machine), issue 26's "green on a real GPU", once every part that benchmarks/gpu_pack.sh made was
# stashed (bash .carry/gpu_carry.sh stash .carry/wK | .carry/dK, one device call each, back to back):
#
#   bash benchmarks/gpu_green.sh tests    # unpack; `pytest -m gpu` (requirements-gpu.txt's packages, the GPU fault
#                                         # test on the GPUs there included: SSD_RAY_ONNX = the pedestrian core FP32)
#   bash benchmarks/gpu_green.sh check    # unpack if not yet; python -m benchmarks.gpu_check (5-8 min)
#
# Each in its own call (the device allows 10 min a call); the machine keeps /tmp while it stays warm, so the second
# call finds the unpacked files. Logs, the junit XML and gpu_check's JSON go to $OUT (default ./gpu_green_out) as
# at most a few files; the summary lines are printed last.
set -uo pipefail
what=${1:?usage: gpu_green.sh tests|check}
out=${OUT:-gpu_green_out}
python=${PYTHON:-python3}
carrier=.carry/gpu_carry.sh
mkdir -p "$out"
start=$SECONDS
step() { echo "== $(date -u +%H:%M:%S) +$((SECONDS - start)) s: $*" | tee -a "$out/$what.log"; }

if [ ! -f /tmp/site/.unpacked ] || [ ! -d /tmp/data ]; then
  step "unpack"
  bash "$carrier" join w /tmp/site.tar.xz && bash "$carrier" join d /tmp/data.tar || exit 3
  sums=$PWD/.carry/SHA256
  (cd /tmp && sha256sum -c "$sums") || { echo "a carried part is missing or damaged"; exit 3; }
  rm -rf /tmp/site /tmp/data && tar -C /tmp -xJf /tmp/site.tar.xz && tar -C /tmp -xf /tmp/data.tar || exit 3
  rm -f /tmp/site.tar.xz /tmp/data.tar && touch /tmp/site/.unpacked
fi
# the carried packages first (onnxruntime-gpu over any CPU onnxruntime there); the CUDA libraries of the machine's
# nvidia-* packages, the carried nvCOMP / nvImageCodec / DALI ones and the toolkit's libnvjpeg (nvImageCodec loads it)
mkdir -p /tmp/nvjpeg && ln -sf /usr/local/cuda*/targets/x86_64-linux/lib/libnvjpeg.so.13* /tmp/nvjpeg/ 2>/dev/null
machine_libs=$("$python" -c 'import glob, site; print(":".join(sorted({p for s in site.getsitepackages() for p in glob.glob(s + "/nvidia/*/lib")})))')
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export LD_LIBRARY_PATH=/tmp/nvjpeg:/tmp/site/nvidia/libnvcomp/lib64:/tmp/site/nvidia/nvimgcodec:/tmp/site/nvidia/dali:$machine_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export NCCL_NVLS_ENABLE=0 RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
pedestrian=/tmp/data/onnx/pedestrian_core_FP32.onnx
inception=/tmp/data/onnx/inception_core_FP16.onnx
voc=/tmp/data/VOC2007

step "machine"
{ date -u; nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc
  "$python" -c 'import sys, torch, torchvision, onnxruntime as ort, ray, nvidia.dali as dali
print(sys.version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.cuda.is_available())
print("onnxruntime", ort.__version__, ort.get_available_providers(), "ray", ray.__version__, "dali", dali.__version__)
from nvidia import nvimgcodec; print("nvimgcodec", nvimgcodec.__version__)
from utils.gpu_input import gpu_decoder, hardware_decoder; print("gpu decoder", gpu_decoder(), "hardware nvJPEG", hardware_decoder() is not None)'
} 2>&1 | tee "$out/machine.txt"

case "$what" in
  tests)
    ws=$(mktemp -d /tmp/ssd-test-ws.XXXXXX)
    mkdir -p "$ws/models/ssdlite_mobilenet_v2_pedestrian"
    cp "$pedestrian" "$ws/models/ssdlite_mobilenet_v2_pedestrian/ssdlite_mobilenet_v2_pedestrian_core_FP32.onnx"
    step "pytest -m gpu (the GPU fault test with SSD_RAY_ONNX=$pedestrian), at most 540 s"
    SSD_TEST_WORKSPACE=$ws SSD_RAY_ONNX=$pedestrian SSD_RAY_VOC=$voc SSD_RAY_REPORT="$out/fault_gpu.json" \
        timeout 540 "$python" -m pytest -m gpu -p no:cacheprovider -rA -q --junitxml="$out/gpu_tests.xml" \
        > "$out/gpu_tests.log" 2>&1
    code=$?
    echo "exit $code" | tee -a "$out/$what.log"
    grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed" "$out/gpu_tests.log" | tail -n 30
    [ -f "$out/fault_gpu.json" ] && cat "$out/fault_gpu.json"
    exit $code;;
  check)
    step "gpu_check, at most 560 s"
    timeout 560 "$python" -m benchmarks.gpu_check --pedestrian-onnx "$pedestrian" --inception-onnx "$inception" \
        --voc "$voc" --image images/person.jpg --out /tmp/gpu_check > "$out/gpu_check.log" 2>&1
    code=$?
    echo "exit $code" | tee -a "$out/$what.log"
    cp /tmp/gpu_check/gpu_check.json /tmp/gpu_check/e2e.json /tmp/gpu_check/ap.json "$out/" 2>/dev/null
    (cd /tmp/gpu_check && tar -czf - --exclude workspace --exclude '*.jpg' .) > "$out/gpu_check_logs.tgz"
    tail -n 12 "$out/gpu_check.log"
    exit $code;;
  *) echo "usage: gpu_green.sh tests|check" >&2; exit 2;;
esac
