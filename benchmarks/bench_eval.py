#!/usr/bin/env python3
"""End-to-end throughput of voc_evaluation.py's pipeline for several backends, side by side in one run.

JPEG files -> decode + resize (decode workers) -> runner.detect -> VOC detections, through the same
executor and utils.evaluation.run_detections as voc_evaluation.py, on the same images for every
backend; the median of --repeats passes after a warm-up. Each backend's model is opened as users do
(utils.plan: Plan.resolve, prepare, open_executor). Prints end-to-end and inference-only images/s and
the ratio to the last backend; writes JSON. Run from the repository root:

  python -m benchmarks.bench_eval -m ssdlite_mobilenet_v2_pedestrian -d ../shared/data/VOCdevkit/VOC2007
  python -m benchmarks.bench_eval --onnx pedestrian_core.onnx --backends onnxruntime -d VOC2007 --limit 20
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from dataclasses import replace
from datetime import date
from pathlib import Path

from benchmarks.common import comma_choices, resolve_plan, write_json
from utils import cli
from utils.evaluation import run_detections
from utils.pipeline import default_workers
from utils.run import open_executor
from utils.runtime import BACKENDS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_source_args(parser)
    cli.add_precision_arg(parser, "precision of the converted backends (default: FP32, or the given file's); "
                                  "tensorflow runs the frozen graph in FP32", default=None)
    cli.add_flavour_arg(parser)
    cli.add_voc_args(parser, limit=300)
    parser.add_argument("-b", "--batch-size", type=int, default=64)
    parser.add_argument("-j", "--workers", type=int, default=default_workers(),
                        help="decode worker threads (default: one per core)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", type=comma_choices(BACKENDS), default=["onnxruntime", "tensorflow"],
                        help="comma-separated, compared to the last (default: onnxruntime,tensorflow)")
    parser.add_argument("--json", type=Path, default=Path("bench_eval.json"))
    args = parser.parse_args(argv)
    cli.setup_logging()

    with cli.user_errors():
        dataset = cli.voc_dataset(args)
        plans = []
        for name in args.backends:              # every plan resolved before anything runs
            frozen = name == "tensorflow"       # the frozen graph as exported, as voc_evaluation.py --compare
            plans.append(resolve_plan(args, name, args.batch_size, "cpu",
                                      **({"precision": None, "flavour": "auto"} if frozen else {})))
        rows = []
        for name, plan in zip(args.backends, plans):
            artifact = plan.prepare()
            with open_executor(plan, artifact, workers=args.workers) as executor:
                warm_up = replace(dataset, images=dataset.images[: args.batch_size])
                run_detections(executor, warm_up, artifact.labels, plan.decode, f"{name} warm-up")
                passes = [run_detections(executor, dataset, artifact.labels, plan.decode, f"{name} pass {i + 1}")[1]
                          for i in range(args.repeats)]
            rows.append({"backend": name, "images": passes[0].images,
                         "end_to_end_img_per_s": statistics.median(p.end_to_end_fps for p in passes),
                         "inference_img_per_s": statistics.median(p.inference_fps for p in passes)})

    reference = rows[-1]["end_to_end_img_per_s"]
    print(f"\n{artifact.model}: {rows[0]['images']} VOC images, batch {args.batch_size}, {args.workers} decode "
          f"workers, median of {args.repeats}, {os.cpu_count()} cores")
    print(f"{'backend':<14}{'end-to-end img/s':>18}{'inference img/s':>18}{'e2e ratio':>11}")
    for row in rows:
        row["end_to_end_ratio"] = row["end_to_end_img_per_s"] / reference
        print(f"{row['backend']:<14}{row['end_to_end_img_per_s']:>18.1f}{row['inference_img_per_s']:>18.1f}"
              f"{row['end_to_end_ratio']:>10.2f}x")
    write_json(args.json, {"model": artifact.model, "date": date.today().isoformat(),
                           "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                           "batch_size": args.batch_size, "workers": args.workers, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
