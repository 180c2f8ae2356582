#!/usr/bin/env python3
"""Where the CPU time goes: OpenVINO's per-operation profile of converted files, beside the input side.

For each ONNX file: compiled as utils.runtime.openvino compiles it (THROUGHPUT hint, one image per request)
plus PERF_COUNT, run over real images, and OpenVINO's own per-node counters summed by operation type
(real time, share of the total, the kernel it chose). With --images also the input side per image: JPEG
decode (Pillow) and TF's legacy resize + scaling (utils.preprocess), on one core. This is the profile that
says what bounds bench_eval's end-to-end figure. Run from the repository root:

  python -m benchmarks.profile_cpu FILE.onnx [FILE.onnx ...] --images DIR --precision BF16 --out profile.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from utils.artifact import INPUT, read_artifact
from utils.files import write_text_atomic


def op_profile(onnx: Path, images: list[np.ndarray], precision: str) -> dict:
    """OpenVINO's per-node counters over ``images``, summed by operation type (executed nodes only)."""
    import openvino as ov  # noqa: PLC0415

    from utils.runtime.openvino import compile_config  # noqa: PLC0415

    artifact = read_artifact("onnx", onnx)
    file_precision = artifact.precision if artifact.precision != "FP32" else precision
    core = ov.Core()
    model = core.read_model(str(onnx))
    width, height = artifact.spec.input_size
    model.reshape({INPUT: [1, 3, height, width]})
    compiled = core.compile_model(model, "CPU", {**compile_config(file_precision), "PERF_COUNT": "YES"})
    request = compiled.create_infer_request()
    for image in images[:3]:                                   # warm-up
        request.infer({INPUT: image[None]})
    by_type: dict = defaultdict(lambda: {"ms": 0.0, "nodes": 0, "kernels": set()})
    started = time.perf_counter()
    for image in images:
        request.infer({INPUT: image[None]})
        for info in request.profiling_info:
            if info.status != ov.ProfilingInfo.Status.EXECUTED:
                continue
            entry = by_type[info.node_type]
            entry["ms"] += info.real_time.total_seconds() * 1e3
            entry["nodes"] += 1
            entry["kernels"].add(info.exec_type)
    wall_ms = (time.perf_counter() - started) * 1e3 / len(images)
    total = sum(entry["ms"] for entry in by_type.values()) / len(images)
    rows = sorted(({"op": op, "ms_per_image": entry["ms"] / len(images), "share": entry["ms"] / len(images) / total,
                    "nodes_per_image": entry["nodes"] // len(images), "kernels": sorted(entry["kernels"])[:4]}
                   for op, entry in by_type.items()), key=lambda row: -row["ms_per_image"])
    return {"file": onnx.name, "precision": file_precision, "flavour": artifact.flavour,
            "one_request_wall_ms_per_image": wall_ms, "counted_ms_per_image": total, "ops": rows}


def input_side(paths: list[Path], input_size: tuple[int, int]) -> tuple[dict, list[np.ndarray]]:
    """Decode and resize time per image on one core, and the network inputs."""
    from utils.preprocess import load_image, preprocess  # noqa: PLC0415

    decode = resize = 0.0
    tensors = []
    for path in paths:
        started = time.perf_counter()
        picture = load_image(path)
        middle = time.perf_counter()
        tensors.append(preprocess(picture, input_size))
        decode, resize = decode + middle - started, resize + time.perf_counter() - middle
    return ({"images": len(paths), "decode_ms_per_image": decode * 1e3 / len(paths),
             "resize_normalise_ms_per_image": resize * 1e3 / len(paths)}, tensors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_cpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("onnx", type=Path, nargs="+", help="converted ONNX files (core or portable)")
    parser.add_argument("--images", type=Path, required=True, help="folder of JPEGs")
    parser.add_argument("--count", type=int, default=60, help="images profiled (default 60)")
    parser.add_argument("--precision", default="FP32", choices=("FP32", "BF16"),
                        help="inference precision of FP32 files (INT8 files run as they are)")
    parser.add_argument("--out", type=Path, default=Path("profile_cpu.json"))
    args = parser.parse_args(argv)
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[:args.count]
    size = read_artifact("onnx", args.onnx[0]).spec.input_size
    side, tensors = input_side(paths, size)
    report = {"date": time.strftime("%Y-%m-%d"), "input_side_one_core": side,
              "profiles": [op_profile(path, tensors, args.precision) for path in args.onnx]}
    write_text_atomic(args.out, json.dumps(report, indent=1))
    print(f"input side, one core: decode {side['decode_ms_per_image']:.2f} ms, resize + scale "
          f"{side['resize_normalise_ms_per_image']:.2f} ms per image")
    for profile in report["profiles"]:
        print(f"\n{profile['file']} ({profile['precision']}): {profile['one_request_wall_ms_per_image']:.2f} ms per "
              f"image in one request, {profile['counted_ms_per_image']:.2f} ms counted by OpenVINO")
        for row in profile["ops"][:8]:
            print(f"  {row['op']:<22}{row['ms_per_image']:>8.3f} ms {row['share'] * 100:>5.1f} %  "
                  f"x{row['nodes_per_image']:<4} {', '.join(row['kernels'])}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
