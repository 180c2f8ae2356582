#!/usr/bin/env python3
"""Engine-only speed of a converted ONNX graph in ONNX Runtime (CUDA when available, else CPU).

Batch-1 latency (median, p90, p99 after warm-up) and throughput at several batch sizes, measured on
the bound run alone (input already on the device, outputs left there), plus the model's FLOPs per
image counted from the ONNX graph and the achieved TFLOP/s. Works from the ONNX file and the
sidecar JSON written beside it by model.py, so it runs where TensorFlow is not installed.

  python benchmarks/bench_engine.py workspace/models/<model>/<model>_core_FP16.onnx --cuda-graph
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from utils.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from utils.converter import spec_from_dict  # noqa: E402
from utils.files import write_text_atomic  # noqa: E402


def conv_flops_per_image(onnx_path: Path) -> float:
    """2 x multiply-accumulates of every Conv / ConvTranspose / Gemm / MatMul at batch 1."""
    model = onnx.load(str(onnx_path))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.value_info, *model.graph.output, *model.graph.input]}
    weights = {init.name: list(init.dims) for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}

    def weight_shape(name: str) -> list[int] | None:
        while name not in weights and name in producers and producers[name].op_type in ("Cast", "DequantizeLinear",
                                                                                          "Identity"):
            name = producers[name].input[0]
        return weights.get(name) or shapes.get(name)

    macs = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            kernel, out = weight_shape(node.input[1]), shapes.get(node.output[0])
            if kernel and out and all(out):
                macs += int(np.prod(out[1:])) * int(np.prod(kernel[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            kernel, out = weight_shape(node.input[1]), shapes.get(node.output[0])
            if kernel and out and all(out):
                macs += int(np.prod(out)) * kernel[0]
    return 2.0 * macs


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "no GPU"


def measure(backend: OnnxRuntimeBackend, batch: int, seconds: float, warmup: int) -> list[float]:
    """Per-run times (s) of the bound run alone, input on the device, after ``warmup`` runs."""
    rng = np.random.default_rng(0)
    width, height = backend.spec.input_size
    backend.run_network(rng.uniform(-1, 1, (batch, 3, height, width)).astype(np.float32))
    runner = backend.runner(batch)
    for _ in range(warmup):
        backend.session.run_with_iobinding(runner.binding)
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 20:
        start = time.perf_counter()
        backend.session.run_with_iobinding(runner.binding)
        times.append(time.perf_counter() - start)
    return times


def compare_with_cpu(onnx_path: Path, spec, key: dict, folder: Path) -> dict:
    """Detections of the same photos on the default device and on the CPU."""
    from utils.backends.base import valid_rows  # noqa: PLC0415
    from utils.preprocess import load_image, preprocess  # noqa: PLC0415

    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    batch = np.stack([preprocess(load_image(path)) for path in paths])
    results = [OnnxRuntimeBackend.from_onnx(str(onnx_path), spec, key["precision"], len(paths), key["flavour"],
                                            use_cuda=use_cuda).detect(batch) for use_cuda in (True, False)]
    (device, device_counts), (cpu, cpu_counts) = results
    score = box = 0.0
    for index in range(len(paths)):
        mine, theirs = valid_rows(device[index], device_counts[index], 0.3), valid_rows(cpu[index], cpu_counts[index], 0.3)
        if mine.shape != theirs.shape:
            return {"images": len(paths), "same_counts": False, "max_score_diff": float("nan"),
                    "max_box_diff": float("nan")}
        if len(mine):
            score = max(score, float(np.abs(mine[:, 2] - theirs[:, 2]).max()))
            box = max(box, float(np.abs(mine[:, 3:] - theirs[:, 3:]).max()))
    return {"images": len(paths), "same_counts": True, "max_score_diff": score, "max_box_diff": box}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("onnx", type=Path, help="a converted graph with its sidecar .json beside it")
    parser.add_argument("--batches", default="1,8,32,64,128")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per batch size")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--cuda-graph", action="store_true", help="ONNX Runtime CUDA graphs (CUDA only)")
    parser.add_argument("--nhwc", action="store_true", help="CUDA provider prefer_nhwc")
    parser.add_argument("--json", type=Path, default=Path("bench_engine.json"))
    parser.add_argument("--check-cpu", type=Path, metavar="IMAGES",
                        help="also compare the device's detections with the CPU's on these photos")
    args = parser.parse_args()

    sidecar = json.loads(args.onnx.with_suffix(".json").read_text(encoding="utf-8"))
    spec, key = spec_from_dict(sidecar["spec"]), sidecar["key"]
    flops = conv_flops_per_image(args.onnx)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        backend = OnnxRuntimeBackend.from_onnx(str(args.onnx), spec, key["precision"], batch, key["flavour"],
                                               cuda_graph=args.cuda_graph, prefer_nhwc=args.nhwc)
        times = measure(backend, batch, args.seconds, args.warmup)
        median = statistics.median(times)
        rows.append({"batch": batch, "device": backend.device, "median_ms": median * 1e3,
                     "p90_ms": float(np.percentile(times, 90)) * 1e3, "p99_ms": float(np.percentile(times, 99)) * 1e3,
                     "img_per_s": batch / median, "tflops": flops * batch / median / 1e12})
    machine = f"{gpu_name()}, {platform.node()}, {platform.machine()}"
    print(f"\n{args.onnx.name}: {key['flavour']} {key['precision']}, {flops / 1e9:.2f} GFLOP/image, "
          f"cuda_graph={args.cuda_graph}, nhwc={args.nhwc}; {machine}; {date.today()}")
    print(f"{'batch':>6}{'median ms':>11}{'p90 ms':>9}{'p99 ms':>9}{'img/s':>10}{'TFLOP/s':>9}")
    for row in rows:
        print(f"{row['batch']:>6}{row['median_ms']:>11.3f}{row['p90_ms']:>9.3f}{row['p99_ms']:>9.3f}"
              f"{row['img_per_s']:>10.1f}{row['tflops']:>9.2f}")
    report = {}
    if args.check_cpu:
        report["cpu_check"] = compare_with_cpu(args.onnx, spec, key, args.check_cpu)
        print(f"device vs CPU on {report['cpu_check']['images']} photos: same counts "
              f"{report['cpu_check']['same_counts']}, max |score| {report['cpu_check']['max_score_diff']:.2e}, "
              f"max |box| {report['cpu_check']['max_box_diff']:.2e}")
    write_text_atomic(args.json, json.dumps({**report, "onnx": args.onnx.name, "flavour": key["flavour"],
                                             "precision": key["precision"], "gflop_per_image": flops / 1e9,
                                             "cuda_graph": args.cuda_graph, "nhwc": args.nhwc, "machine": machine,
                                             "date": date.today().isoformat(), "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
