#!/usr/bin/env bash
# Here (the CPU machine): everything the GPU session of issue 26 (benchmarks/gpu_green.sh) needs that the GPU machine
# lacks, as parts of at most 58 MB in the git-ignored .carry/ folder, one part per device call:
#   .carry/w1 .. .carry/wN  one xz archive of a Python 3.12 site folder: onnxruntime-gpu 1.31.1, DALI 2.4.0,
#                           nvImageCodec 0.9.0.20, nvCOMP 5.3.0.16, Ray 2.60.0 and their pure-Python needs (the GPU
#                           machine has torch, torchvision, CuPy, numpy, protobuf, ... but no registry)
#   .carry/d1 .. .carry/dM  a tar of the 300 VOC images (JPEGImages, Annotations, ImageSets) and the two ONNX files
#   .carry/gpu_carry.sh     ../shared's carrier (../shared does not travel)
#
#   bash benchmarks/gpu_pack.sh PEDESTRIAN_CORE_FP32.onnx INCEPTION_CORE_FP16.onnx [VOC2007_DIR]
#
# The ONNX files: python model.py -m ssdlite_mobilenet_v2_pedestrian --flavour core -p FP32, and the InceptionV2
# stand-in (../shared/models/make_inception_v2_random.py, then model.py -m FOLDER --flavour core -p FP16).
# Then, on the device machine, calls back to back (each within ~30 s of the last), each carrying one part:
#   bash .carry/gpu_carry.sh stash .carry/w1   ...   bash .carry/gpu_carry.sh stash .carry/dM
# and the last one carrying .carry/gpu_carry.sh and .carry/SHA256 (benchmarks/gpu_green.sh travels with the tree):
#   bash benchmarks/gpu_green.sh tests     (and in the next call: bash benchmarks/gpu_green.sh check)
set -euo pipefail
pedestrian=${1:?usage: gpu_pack.sh PEDESTRIAN_CORE_FP32.onnx INCEPTION_CORE_FP16.onnx [VOC2007_DIR]}
inception=${2:?usage: gpu_pack.sh PEDESTRIAN_CORE_FP32.onnx INCEPTION_CORE_FP16.onnx [VOC2007_DIR]}
voc=${3:-../shared/data/VOCdevkit/VOC2007}
carrier=../shared/tools/gpu_carry.sh
part_mb=${PART_MB:-58}
work=${WORK:-/tmp/gpu-pack}
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo /.carry/ >> .git/info/exclude; }

wheels=(onnxruntime-gpu==1.31.1 nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20
        nvidia-libnvcomp-cu13==5.3.0.16 ray==2.60.0
        astunparse gast optree nvtx makefun libcst six click jsonschema jsonschema-specifications referencing
        rpds-py attrs msgpack array-api-compat defusedxml)
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform any)
rm -rf "$work" && mkdir -p "$work/whl" "$work/site" "$work/data/VOC2007" "$work/data/onnx"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d "$work/whl" "${wheels[@]}"
python3 -m pip install -q --no-deps --no-index --no-compile --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" --target "$work/site" "$work"/whl/*.whl
# what the GPU machine never runs: Ray's Java jars, RLlib, Serve, dashboard client sources; other Pythons' modules
rm -rf "$work"/site/ray/jars "$work"/site/ray/rllib "$work"/site/ray/serve "$work"/site/ray/dashboard/client/src
find "$work/site" -name '*.so' -name '*cpython-3*' ! -name '*cpython-312*' -delete
find "$work/site" -name __pycache__ -prune -exec rm -rf {} +
echo "site: $(du -sh "$work/site" | cut -f1) from $(ls "$work/whl" | wc -l) wheels"
tar -C "$work" -cf - site | xz -T"$(nproc)" -6 > "$work/site.tar.xz"
echo "archive: $(du -h "$work/site.tar.xz" | cut -f1)"

cp -r "$voc"/JPEGImages "$voc"/Annotations "$voc"/ImageSets "$work/data/VOC2007/"
cp "$pedestrian" "$work/data/onnx/pedestrian_core_FP32.onnx"
cp "$inception" "$work/data/onnx/inception_core_FP16.onnx"
tar -C "$work" -cf "$work/data.tar" data

rm -rf .carry/w[0-9]* .carry/d[0-9]* && mkdir -p .carry
bash "$carrier" split "$work/site.tar.xz" "$part_mb" w
bash "$carrier" split "$work/data.tar" "$part_mb" d
cp "$carrier" .carry/gpu_carry.sh
(cd "$work" && sha256sum site.tar.xz data.tar) > .carry/SHA256     # gpu_green.sh checks the joined files
rm -rf "$work"
echo "carry, one call each: $(ls -d .carry/w[0-9]* .carry/d[0-9]* | tr '\n' ' ')"
echo "then carry .carry/gpu_carry.sh and .carry/SHA256 and run: bash benchmarks/gpu_green.sh tests (then check)"
