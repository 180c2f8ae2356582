#!/usr/bin/env bash
# Carry a large wheel (onnxruntime-gpu, ~256 MB) to the GPU machine, whose calls take at most 64 MiB.
#
# Here:   bash benchmarks/gpu_carry.sh split WHEEL [MB]   -> .carry/p1 ... .carry/pN (one part each, + the wheel's name)
#         (.carry/ must be ignored: echo /.carry/ >> .git/info/exclude)
# There, one call per part, each within the machine's warm window, carrying .carry/pK:
#         bash benchmarks/gpu_carry.sh stash .carry/pK    -> /tmp/carry-parts
# There, in the last call:
#         eval "$(bash benchmarks/gpu_carry.sh install)"  -> pip install --target /tmp/site, then PYTHONPATH and
#                                                             LD_LIBRARY_PATH (the CUDA libraries of the
#                                                             machine's nvidia-* packages) exported
set -euo pipefail
PARTS=/tmp/carry-parts
case "${1:-}" in
  split)
    wheel=$2; mb=${3:-50}
    rm -rf .carry && mkdir -p .carry/tmp
    split -b "${mb}M" -d -a 2 "$wheel" .carry/tmp/part.
    i=0
    for part in .carry/tmp/part.*; do
      i=$((i + 1)); mkdir -p ".carry/p$i"; mv "$part" ".carry/p$i/"; basename "$wheel" > ".carry/p$i/NAME"
    done
    rmdir .carry/tmp
    echo "$i parts: $(ls -d .carry/p* | tr '\n' ' ')";;
  stash)
    mkdir -p "$PARTS"; cp "$2"/part.* "$PARTS"/; cp "$2"/NAME "$PARTS"/NAME
    echo "stashed $(ls "$PARTS" | grep -c part) parts";;
  install)
    name=$(cat "$PARTS/NAME")
    cat "$PARTS"/part.* > "/tmp/$name"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "/tmp/$name" >&2
    libs=$(python3 -c 'import glob, site; print(":".join(sorted({p for s in site.getsitepackages() for p in glob.glob(s + "/nvidia/*/lib")})))')
    echo "export PYTHONPATH=/tmp/site\${PYTHONPATH:+:\$PYTHONPATH}"
    echo "export LD_LIBRARY_PATH=$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
    echo "installed $name into /tmp/site" >&2;;
  *) echo "usage: $0 split WHEEL [MB] | stash DIR | install" >&2; exit 2;;
esac
