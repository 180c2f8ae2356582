#!/usr/bin/env python3
"""Images/s end to end (files -> detections in the driver) of the single-process path against the Ray path
(utils.distributed) with 1, 2 (, 4) detector actors: one per GPU on a machine with GPUs, else CPU actors.

Same file, backend (onnxruntime), batch size, decode path and runtime options for every row, both through
utils.run.open_executor; the images are the VOC images (-d) repeated to at least --images. Each executor is
opened once outside the timing (the single process's runner; the Ray pool, its actors started and their
engines opened), warmed up by one full pass, then timed over --repeats passes (median). A Ray pass starts
from an empty shard folder and includes the shards, the manifest and the merge. Scaling efficiency =
img/s with N actors / (N x img/s with 1 actor); "ray_1 / single" is the cost of going through Ray.
Run from the repository root:

  python -m benchmarks.bench_ray --onnx inception_core_FP16.onnx -d ../shared/data/VOCdevkit/VOC2007 \\
      --images 20000 -b 128 --decode gpu --cuda-graph --nhwc --gpus 1,2 --out bench_ray.json
  python -m benchmarks.bench_ray --onnx pedestrian_core.onnx -d VOC2007 --images 64 -b 8 --repeats 1
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import statistics
import sys
import time
from datetime import date
from pathlib import Path

from benchmarks.common import add_runtime_args, gpu_name, resolve_plan, write_json
from utils import cli, distributed
from utils.errors import UserError
from utils.pipeline import DECODE_CHOICES, default_workers
from utils.run import open_executor


def repeated(paths: list[Path], count: int) -> list[Path]:
    """``paths`` repeated until there are at least ``count``."""
    return paths * max(1, math.ceil(count / len(paths)))


def timed(executor, paths: list[Path], keys: list[str], stages: list | None = None) -> float:
    """Seconds of one pass over ``paths`` through an opened executor; Ray shards are removed afterwards, and the
    Ray driver's timeline of the pass (executor.stages) is appended to ``stages``."""
    started = time.perf_counter()
    for _ in executor.batches(paths, keys):
        pass
    seconds = time.perf_counter() - started
    if stages is not None and getattr(executor, "stages", None):
        stages.append({**executor.stages, "total_s": seconds})
    folder = getattr(executor, "folder", None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    return seconds


def measure(executor, paths: list[Path], repeats: int) -> dict:
    """Warm-up pass, then the median of ``repeats`` passes (and, on Ray, the driver's timeline of each)."""
    keys = [str(index) for index in range(len(paths))]
    warmup = timed(executor, paths, keys)
    stages: list = []
    seconds = [timed(executor, paths, keys, stages) for _ in range(repeats)]
    report = {"images_per_s": len(paths) / statistics.median(seconds), "seconds": seconds, "warmup_seconds": warmup}
    return {**report, "driver_stages": stages} if stages else report


def actor_counts(text: str) -> list[int]:
    try:
        counts = [int(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated actor counts, got '{text}'") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"actor counts must be at least 1, got '{text}'")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_ray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_source_args(parser)
    add_runtime_args(parser)
    cli.add_voc_args(parser)
    parser.add_argument("--images", type=int, default=20000, help="repeat the VOC images to at least this many")
    parser.add_argument("-b", "--batch-size", type=int, default=128)
    parser.add_argument("--decode", choices=DECODE_CHOICES, default="auto",
                        help="cpu, gpu (in the single process and in each GPU actor) or auto")
    parser.add_argument("--gpus", type=actor_counts, default=None, metavar="N,N",
                        help="Ray detector actor counts (default 1,2 and 4 where the cluster has 4 GPUs); on a "
                             "machine without GPUs they are CPU actors")
    parser.add_argument("-j", "--workers", type=int, default=default_workers(),
                        help="decode worker threads of the single-process path (default: one per core, as "
                             "detect_objects.py)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", "--json", dest="out", type=Path, default=Path("bench_ray.json"))
    args = parser.parse_args(argv)
    cli.setup_logging()

    with cli.user_errors():
        paths = repeated([image.path for image in cli.voc_dataset(args).images], args.images)
        plan = resolve_plan(args, "onnxruntime", args.batch_size, args.decode)
        artifact = plan.prepare()
        rows = {}
        with open_executor(plan, artifact, workers=args.workers) as executor:
            device = executor.runner.device
            rows["single"] = measure(executor, paths, args.repeats)
        distributed.connect(None)               # the cluster's start is not timed
        ray = distributed.import_ray()
        gpus = int(ray.cluster_resources().get("GPU", 0))
        counts = args.gpus or ([1, 2, 4] if gpus >= 4 else [1, 2])
        if gpus and max(counts) > gpus:
            raise UserError(f"--gpus {','.join(map(str, counts))}: the cluster has {gpus} GPUs (one actor each)")
        for actors in counts:
            with open_executor(plan, artifact, ray="local", ray_workers=actors, fresh=True) as executor:
                started = time.perf_counter()
                pool = executor.open()          # actors started, engines opened: not timed
                opened = time.perf_counter() - started
                try:
                    rows[f"ray_{actors}"] = {**measure(executor, paths, args.repeats), "pool_start_seconds": opened,
                                             "actors": list(pool.info.values())}
                finally:
                    executor.close()
    single, one = rows["single"]["images_per_s"], rows[f"ray_{counts[0]}"]["images_per_s"]
    base = counts[0]
    scaling = {f"ray_{n}": rows[f"ray_{n}"]["images_per_s"] / one for n in counts}
    efficiency = {f"ray_{n}": scaling[f"ray_{n}"] * base / n for n in counts}
    print(f"{'path':<10} {'images/s':>9} {'vs ray_' + str(base):>9} {'efficiency':>10}")
    print(f"{'single':<10} {single:>9.1f}")
    for n in counts:
        name = f"ray_{n}"
        print(f"{name:<10} {rows[name]['images_per_s']:>9.1f} {scaling[name]:>8.2f}x {efficiency[name]:>9.0%}")
        for stage in rows[name].get("driver_stages", [])[-1:]:     # where the run's fixed cost goes
            print(f"{'':<10} driver: " + ", ".join(f"{k[:-2]} {v:.2f} s" if k.endswith("_s") else f"{k} {v}"
                                                   for k, v in stage.items()))
    print(f"ray_{base} / single: {one / single:.0%} ({len(paths)} images, batch {args.batch_size}, decode "
          f"{plan.decode}, {'GPU' if gpus else 'CPU'} actors, median of {args.repeats})")
    write_json(args.out, {
        "date": date.today().isoformat(), "machine": platform.platform(), "cpus": os.cpu_count(),
        "gpu": gpu_name() if gpus else "no GPU", "cluster_gpus": gpus, "device": device, "model": artifact.model,
        "file": str(artifact.path), "flavour": artifact.flavour, "precision": artifact.precision,
        "images": len(paths), "batch": args.batch_size, "decode": plan.decode,
        "options": {"cuda_graph": plan.options.cuda_graph, "nhwc": plan.options.nhwc},
        "block": distributed.block_size(plan, gpus > 0), "repeats": args.repeats, "rows": rows,
        "images_per_s": {name: row["images_per_s"] for name, row in rows.items()},
        "scaling": scaling, "scaling_efficiency": efficiency, "ray_1_vs_single": one / single if base == 1 else None})
    print(f"Saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
