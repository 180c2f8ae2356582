#!/usr/bin/env python3
"""Images/s of the single-process path and of the Ray path (utils.distributed) with 1 and 2 detector actors.

Same images, same backend and batch size; the median of --repeats passes after a warm-up. A Ray pass
starts from an empty shard folder and includes starting the actor pool (Ray Data makes one per run)
but not starting the cluster. Overhead per image = 1000 / (Ray, 1 actor) - 1000 / (single) ms.

  python benchmarks/bench_ray.py -m ssdlite_mobilenet_v2_pedestrian -d ../shared/data/VOCdevkit/VOC2007
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import cli, distributed  # noqa: E402
from utils.backends import create_backend  # noqa: E402
from utils.detection import detect_images  # noqa: E402
from utils.files import write_text_atomic  # noqa: E402
from utils.models import resolve_model  # noqa: E402


def single_pass(backend, paths: list[Path], batch: int) -> float:
    """Seconds of detect_objects.py's loop (read, preprocess, detect) over ``paths``."""
    started = time.perf_counter()
    for _ in detect_images(backend, paths, batch):
        pass
    return time.perf_counter() - started


def ray_pass(config: distributed.DetectorConfig, paths: list[Path], workers: int) -> float:
    """Seconds of one Ray run over ``paths`` into a fresh shard folder."""
    keys = [path.name for path in paths]
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        distributed.run(keys, paths, config, Path(folder), {"bench": workers}, workers, log=cli.log)
        return time.perf_counter() - started


def median_fps(images: int, measure, repeats: int) -> float:
    measure()  # warm-up
    return images / statistics.median(measure() for _ in range(repeats))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(parser)
    cli.add_voc_args(parser, limit=120)
    parser.add_argument("-b", "--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("bench_ray.json"))
    args = parser.parse_args()

    with cli.user_errors():
        paths = [image.path for image in cli.voc_dataset(args).images]
        model = resolve_model(args.model, args.workspace)
        backend = create_backend("onnxruntime", model, max_batch_size=args.batch_size, log=cli.log)
        results = {"single": median_fps(len(paths), lambda: single_pass(backend, paths, args.batch_size),
                                        args.repeats)}
        distributed.connect(None)
        config = distributed.DetectorConfig("onnxruntime", model, batch_size=args.batch_size)
        for workers in (1, 2):
            results[f"ray_{workers}_actors"] = median_fps(len(paths), lambda: ray_pass(config, paths, workers),
                                                          args.repeats)
    overhead_ms = 1000 / results["ray_1_actors"] - 1000 / results["single"]
    print(f"{'path':<16} {'images/s':>9}")
    for name, fps in results.items():
        print(f"{name:<16} {fps:>9.1f}")
    print(f"Ray overhead per image (1 actor vs single): {overhead_ms:.2f} ms "
          f"({len(paths)} images, batch {args.batch_size}, median of {args.repeats})")
    write_text_atomic(args.json, json.dumps({
        "date": date.today().isoformat(), "machine": platform.platform(), "cpus": os.cpu_count(),
        "model": model.name, "images": len(paths), "batch": args.batch_size, "repeats": args.repeats,
        "images_per_s": results, "ray_overhead_ms_per_image": overhead_ms}, indent=1))
    print(f"Saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
