#!/usr/bin/env python3
"""End-to-end detection throughput of the backends, side by side in one run.

Files on disk -> load + preprocess (utils.preprocess) -> backend.detect, batch size B, over the
same images for every backend; the median of --repeats passes. Reports end-to-end and
inference-only images/s and writes JSON.

  python benchmarks/bench_detect.py -m ssdlite_mobilenet_v2_pedestrian --images ../shared/data/VOCdevkit/VOC2007/JPEGImages
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from utils import cli  # noqa: E402
from utils.backends import create_backend  # noqa: E402
from utils.detection import collect_images  # noqa: E402
from utils.files import write_text_atomic  # noqa: E402
from utils.models import resolve_model  # noqa: E402
from utils.preprocess import load_image, preprocess  # noqa: E402


def one_pass(backend, files: list[Path], batch_size: int) -> tuple[float, float]:
    """(end-to-end seconds, inference-only seconds) for one pass over the files."""
    inference = 0.0
    started = time.perf_counter()
    for start in range(0, len(files), batch_size):
        batch = np.stack([preprocess(load_image(path), backend.spec.input_size)
                          for path in files[start:start + batch_size]])
        infer_start = time.perf_counter()
        backend.detect(batch)
        inference += time.perf_counter() - infer_start
    return time.perf_counter() - started, inference


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(parser)
    parser.add_argument("--images", required=True, help="folder of JPEG images")
    parser.add_argument("--limit", type=int, default=300, help="first N images (default 300)")
    parser.add_argument("-b", "--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="onnxruntime,tensorflow")
    parser.add_argument("--json", type=Path, default=Path("bench_detect.json"))
    args = parser.parse_args()

    files = collect_images([args.images]).files[: args.limit]
    with cli.user_errors():
        model = resolve_model(args.model, args.workspace)
        rows = []
        for name in args.backends.split(","):
            backend = create_backend(name, model, max_batch_size=args.batch_size, log=cli.log)
            one_pass(backend, files[: 2 * args.batch_size], args.batch_size)  # warm-up
            passes = [one_pass(backend, files, args.batch_size)
                      for _ in tqdm(range(args.repeats), desc=name, file=sys.stderr)]
            e2e = statistics.median(p[0] for p in passes)
            infer = statistics.median(p[1] for p in passes)
            rows.append({"backend": name, "images": len(files), "batch_size": args.batch_size,
                         "end_to_end_img_per_s": len(files) / e2e, "inference_img_per_s": len(files) / infer})

    print(f"{model.name}, {len(files)} images, batch {args.batch_size}, median of {args.repeats}")
    print(f"{'backend':<14}{'end-to-end img/s':>18}{'inference img/s':>18}")
    for row in rows:
        print(f"{row['backend']:<14}{row['end_to_end_img_per_s']:>18.1f}{row['inference_img_per_s']:>18.1f}")
    write_text_atomic(args.json, json.dumps({"model": model.name, "date": date.today().isoformat(),
                                             "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
                                             "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
