#!/usr/bin/env bash
# Carry large files (the onnxruntime-gpu wheel, ~256 MB; an FP32 InceptionV2 ONNX, ~100 MB) to the GPU
# machine, whose calls take at most 64 MiB each and which stays warm only ~30 s between calls.
#
# Here:   bash benchmarks/gpu_carry.sh split FILE [MB] [TAG]  -> .carry/TAG1 ... .carry/TAGn (default TAG p)
#         (.carry/ must be git-ignored: echo /.carry/ >> .git/info/exclude)
# There, one call per part, back to back, each carrying its .carry/TAGk:
#         bash benchmarks/gpu_carry.sh stash .carry/TAGk            -> /tmp/carry-parts/TAG
# There, once all parts of a TAG are stashed:
#         eval "$(bash benchmarks/gpu_carry.sh install [TAG])"      -> the wheel pip-installed into /tmp/site;
#                                                                     PYTHONPATH and LD_LIBRARY_PATH (the CUDA
#                                                                     libraries of the machine's nvidia-*
#                                                                     packages) exported
#         bash benchmarks/gpu_carry.sh join TAG DEST                -> any other file reassembled at DEST
set -euo pipefail
ROOT=/tmp/carry-parts
case "${1:-}" in
  split)
    file=$2; mb=${3:-50}; tag=${4:-p}
    rm -rf .carry/"$tag"[0-9]* .carry/tmp-"$tag" && mkdir -p .carry/tmp-"$tag"
    split -b "${mb}M" -d -a 2 "$file" .carry/tmp-"$tag"/part.
    i=0
    for part in .carry/tmp-"$tag"/part.*; do
      i=$((i + 1)); mkdir -p ".carry/$tag$i"; mv "$part" ".carry/$tag$i/"; basename "$file" > ".carry/$tag$i/NAME"
    done
    rmdir .carry/tmp-"$tag"
    echo "$i parts: $(ls -d .carry/"$tag"[0-9]* | tr '\n' ' ')";;
  stash)
    tag=$(basename "$2" | sed 's/[0-9]*$//'); mkdir -p "$ROOT/$tag"
    cp "$2"/part.* "$2"/NAME "$ROOT/$tag"/
    echo "stashed $(ls "$ROOT/$tag" | grep -c part) parts of $(cat "$ROOT/$tag/NAME")";;
  join)
    cat "$ROOT/$2"/part.* > "$3"; echo "joined $(cat "$ROOT/$2/NAME") -> $3";;
  install)
    tag=${2:-p}; name=$(cat "$ROOT/$tag/NAME")
    cat "$ROOT/$tag"/part.* > "/tmp/$name"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "/tmp/$name" >&2
    libs=$(python3 -c 'import glob, site; print(":".join(sorted({p for s in site.getsitepackages() for p in glob.glob(s + "/nvidia/*/lib")})))')
    echo "export PYTHONPATH=/tmp/site\${PYTHONPATH:+:\$PYTHONPATH}"
    echo "export LD_LIBRARY_PATH=$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
    echo "installed $name into /tmp/site" >&2;;
  *) echo "usage: $0 split FILE [MB] [TAG] | stash DIR | join TAG DEST | install [TAG]" >&2; exit 2;;
esac
