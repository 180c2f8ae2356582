#!/usr/bin/env python3
"""Where ONNX Runtime spends an engine run: kernel time per op type against wall time (ORT profiler).

  python benchmarks/profile_ort.py MODEL.onnx --batch 128 [--nhwc]
"""

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.backends.onnxruntime import cuda_provider_options  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("onnx")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--nhwc", action="store_true")
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.enable_profiling = True
    providers = [("CUDAExecutionProvider", cuda_provider_options(prefer_nhwc=args.nhwc)), "CPUExecutionProvider"]
    session = ort.InferenceSession(args.onnx, options, providers=providers)
    feed = {"Input": np.random.default_rng(0).uniform(-1, 1, (args.batch, 3, 300, 300)).astype(np.float32)}
    for _ in range(3):
        session.run(None, feed)
    start = time.perf_counter()
    for _ in range(args.runs):
        session.run(None, feed)
    wall = (time.perf_counter() - start) / args.runs
    events = json.loads(Path(session.end_profiling()).read_text())
    kernels = collections.Counter()
    for event in events:
        if event.get("cat") == "Kernel":
            kernels[event["args"].get("op_name", event["name"])] += event["dur"]
    total = sum(kernels.values()) / (args.runs + 3) / 1e3
    print(f"wall per run {wall * 1e3:.2f} ms (incl. host<->device copies); GPU kernel time per run {total:.2f} ms")
    for name, micros in kernels.most_common(12):
        print(f"  {name:<28}{micros / (args.runs + 3) / 1e3:8.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
