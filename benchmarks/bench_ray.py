#!/usr/bin/env python3
"""Images/s of the single-process path and of the Ray path (utils.distributed) with 1 and 2 detector actors.

Same images, same file, backend (onnxruntime) and batch size, both through utils.run.open_executor
(the local executor, and the Ray executor as ``--ray`` runs it); the median of --repeats passes after
a warm-up. A Ray pass starts from an empty shard folder (a fresh run) and includes starting the actor
pool (Ray Data makes one per run) but not starting the cluster. Overhead per image =
1000 / (Ray, 1 actor) - 1000 / (single) ms. Run from the repository root:

  python -m benchmarks.bench_ray -m ssdlite_mobilenet_v2_pedestrian -d ../shared/data/VOCdevkit/VOC2007
  python -m benchmarks.bench_ray --onnx pedestrian_core.onnx -d VOC2007 --limit 16 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from datetime import date
from pathlib import Path

from benchmarks.common import resolve_plan, write_json
from utils import cli, distributed
from utils.run import open_executor


def timed_pass(plan, artifact, paths: list[Path], workers: int, ray: str | None = None,
               ray_workers: int | None = None) -> float:
    """Seconds of one run over ``paths`` through an executor (opened outside the timing); a Ray run starts
    from an empty shard folder and its shards are removed afterwards."""
    keys = [path.name for path in paths]
    with open_executor(plan, artifact, workers=workers, ray=ray, ray_workers=ray_workers, fresh=True) as executor:
        started = time.perf_counter()
        for _ in executor.batches(paths, keys, keep_images=ray is None):
            pass
        seconds = time.perf_counter() - started
        folder = getattr(executor, "folder", None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    return seconds


def median_fps(images: int, measure, repeats: int) -> float:
    measure()  # warm-up
    return images / statistics.median(measure() for _ in range(repeats))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_ray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_source_args(parser)
    cli.add_precision_arg(parser, "precision to convert -m MODEL to (default: FP32, or the given file's)", default=None)
    cli.add_flavour_arg(parser)
    cli.add_voc_args(parser, limit=120)
    parser.add_argument("-b", "--batch-size", type=int, default=8)
    parser.add_argument("-j", "--workers", type=int, default=0,
                        help="decode worker threads of the single-process path (default 0: in the detecting thread, "
                             "as this benchmark always measured it; detect_objects.py uses one per core)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("bench_ray.json"))
    args = parser.parse_args(argv)
    cli.setup_logging()

    with cli.user_errors():
        paths = [image.path for image in cli.voc_dataset(args).images]
        plan = resolve_plan(args, "onnxruntime", args.batch_size, "cpu")
        artifact = plan.prepare()
        results = {"single": median_fps(len(paths), lambda: timed_pass(plan, artifact, paths, args.workers),
                                        args.repeats)}
        distributed.connect(None)               # the cluster's start is not timed
        for actors in (1, 2):
            results[f"ray_{actors}_actors"] = median_fps(
                len(paths), lambda: timed_pass(plan, artifact, paths, 0, "local", actors), args.repeats)
    overhead_ms = 1000 / results["ray_1_actors"] - 1000 / results["single"]
    print(f"{'path':<16} {'images/s':>9}")
    for name, fps in results.items():
        print(f"{name:<16} {fps:>9.1f}")
    print(f"Ray overhead per image (1 actor vs single): {overhead_ms:.2f} ms "
          f"({len(paths)} images, batch {args.batch_size}, median of {args.repeats})")
    write_json(args.json, {
        "date": date.today().isoformat(), "machine": platform.platform(), "cpus": os.cpu_count(),
        "model": artifact.model, "images": len(paths), "batch": args.batch_size, "repeats": args.repeats,
        "images_per_s": results, "ray_overhead_ms_per_image": overhead_ms})
    print(f"Saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
