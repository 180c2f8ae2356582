#!/usr/bin/env python3
"""Engine-only speed of a converted ONNX graph in ONNX Runtime (CUDA when available, else CPU).

Batch-1 latency (median, p90, p99 after warm-up) and throughput at several batch sizes, measured on
the bound run alone (input already on the device, outputs left there), plus the model's FLOPs per
image counted from the ONNX graph and the achieved TFLOP/s. Runs from a converted ONNX file (--onnx,
model.py's output; it carries its own description), so it runs where TensorFlow is not installed;
-m MODEL converts first. Run from the repository root:

  python -m benchmarks.bench_engine --onnx workspace/models/<model>/<model>_core_FP16.onnx --cuda-graph --nhwc
  python -m benchmarks.bench_engine -m ssdlite_mobilenet_v2_pedestrian --flavour core --batches 1,8 --seconds 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import onnx

from benchmarks.common import add_runtime_args, gpu_name, measure, parse_batches, resolve_plan, write_json
from utils import cli
from utils.run import collect_images, detect_batches


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


def detections_by_image(plan, artifact, paths: list[Path]) -> list[np.ndarray]:
    """The [M, 7] rows (confidence >= 0.3) of every photo, through utils.run.detect_batches in one batch."""
    rows = []
    with plan.open(artifact) as runner:
        for batch in detect_batches(runner, paths, len(paths)):
            rows += [result.rows[result.rows[:, 2] >= 0.3] if result.error is None else np.zeros((0, 7), np.float32)
                     for result in batch.results]
    return rows


def compare_with_cpu(args: argparse.Namespace, artifact, folder: Path) -> dict:
    """Detections of the same photos on the default device and on the CPU (ONNX Runtime without CUDA)."""
    paths = collect_images([str(folder)]).files
    plan = resolve_plan(args, "onnxruntime", len(paths))
    # Plan.resolve has no device choice: the CPU twin of the plan is its runtime options with use_cuda off
    on_cpu = replace(plan, options=replace(plan.options, use_cuda=False, cuda_graph=False, nhwc=False))
    score = box = 0.0
    for mine, theirs in zip(detections_by_image(plan, artifact, paths), detections_by_image(on_cpu, artifact, paths)):
        if mine.shape != theirs.shape:
            return {"images": len(paths), "same_counts": False, "max_score_diff": float("nan"),
                    "max_box_diff": float("nan")}
        if len(mine):
            score = max(score, float(np.abs(mine[:, 2] - theirs[:, 2]).max()))
            box = max(box, float(np.abs(mine[:, 3:] - theirs[:, 3:]).max()))
    return {"images": len(paths), "same_counts": True, "max_score_diff": score, "max_box_diff": box}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_source_args(parser)
    add_runtime_args(parser)
    parser.add_argument("--batches", type=parse_batches, default=parse_batches("1,8,32,64,128"),
                        help="batch sizes (default 1,8,32,64,128)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per batch size")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--json", type=Path, default=Path("bench_engine.json"))
    parser.add_argument("--check-cpu", type=Path, metavar="IMAGES",
                        help="also compare the device's detections with the CPU's on these photos")
    args = parser.parse_args(argv)
    cli.setup_logging()

    with cli.user_errors():
        plans = [resolve_plan(args, "onnxruntime", batch) for batch in args.batches]
        artifact = plans[0].prepare()           # ONNX Runtime runs the same file at every batch size
        flops = conv_flops_per_image(artifact.path)
        rows = []
        for plan in plans:                      # one session per batch size: a CUDA graph is bound to its buffers
            with plan.open(artifact) as runner:
                times = measure(runner, plan.batch_size, args.seconds, args.warmup)
                device = runner.device
            median = statistics.median(times)
            rows.append({"batch": plan.batch_size, "device": device, "median_ms": median * 1e3,
                         "p90_ms": float(np.percentile(times, 90)) * 1e3,
                         "p99_ms": float(np.percentile(times, 99)) * 1e3,
                         "img_per_s": plan.batch_size / median, "tflops": flops * plan.batch_size / median / 1e12})
        report = {}
        if args.check_cpu:
            report["cpu_check"] = compare_with_cpu(args, artifact, args.check_cpu)

    machine = f"{gpu_name()}, {platform.node()}, {platform.machine()}"
    print(f"\n{artifact.path.name}: {artifact.flavour} {artifact.precision}, {flops / 1e9:.2f} GFLOP/image, "
          f"cuda_graph={args.cuda_graph}, nhwc={args.nhwc}; {machine}; {date.today()}")
    print(f"{'batch':>6}{'median ms':>11}{'p90 ms':>9}{'p99 ms':>9}{'img/s':>10}{'TFLOP/s':>9}")
    for row in rows:
        print(f"{row['batch']:>6}{row['median_ms']:>11.3f}{row['p90_ms']:>9.3f}{row['p99_ms']:>9.3f}"
              f"{row['img_per_s']:>10.1f}{row['tflops']:>9.2f}")
    if "cpu_check" in report:
        check = report["cpu_check"]
        print(f"device vs CPU on {check['images']} photos: same counts {check['same_counts']}, "
              f"max |score| {check['max_score_diff']:.2e}, max |box| {check['max_box_diff']:.2e}")
    write_json(args.json, {**report, "onnx": artifact.path.name, "flavour": artifact.flavour,
                           "precision": artifact.precision, "gflop_per_image": flops / 1e9,
                           "cuda_graph": args.cuda_graph, "nhwc": args.nhwc, "machine": machine,
                           "date": date.today().isoformat(), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
