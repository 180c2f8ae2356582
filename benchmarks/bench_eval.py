#!/usr/bin/env python3
"""End-to-end throughput of voc_evaluation.py's pipeline for several backends, side by side in one run.

JPEG files -> decode + resize (utils.preprocess, optional workers) -> backend.detect -> VOC
detections, on the same images for every backend; the median of --repeats passes after a warm-up.
Prints end-to-end and inference-only images/s and the ratio to the last backend; writes JSON.

  python benchmarks/bench_eval.py -m ssdlite_mobilenet_v2_pedestrian -d ../shared/data/VOCdevkit/VOC2007
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from dataclasses import replace
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import cli  # noqa: E402
from utils.backends import create_backend  # noqa: E402
from utils.evaluation import run_detections  # noqa: E402
from utils.files import write_text_atomic  # noqa: E402
from utils.labels import label_map_for  # noqa: E402
from utils.models import resolve_model  # noqa: E402
from utils.pipeline import default_workers  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(parser)
    cli.add_voc_args(parser, limit=300)
    parser.add_argument("-b", "--batch-size", type=int, default=64)
    parser.add_argument("-j", "--workers", type=int, default=default_workers(),
                        help="decode worker threads (default: one per core)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="onnxruntime,tensorflow", help="comma-separated, compared to the last")
    parser.add_argument("--json", type=Path, default=Path("bench_eval.json"))
    args = parser.parse_args()

    with cli.user_errors():
        dataset = cli.voc_dataset(args)
        model = resolve_model(args.model, args.workspace)
        rows = []
        for name in args.backends.split(","):
            backend = create_backend(name, model, max_batch_size=args.batch_size, log=cli.log)
            labels = label_map_for(model.labels, backend.spec.num_classes)
            warm_up = replace(dataset, images=dataset.images[: args.batch_size])
            run_detections(backend, warm_up, labels, args.batch_size, args.workers)
            passes = [run_detections(backend, dataset, labels, args.batch_size, args.workers)[1]
                      for _ in range(args.repeats)]
            rows.append({"backend": name, "images": passes[0].images,
                         "end_to_end_img_per_s": statistics.median(p.end_to_end_fps for p in passes),
                         "inference_img_per_s": statistics.median(p.inference_fps for p in passes)})

    reference = rows[-1]["end_to_end_img_per_s"]
    print(f"\n{model.name}: {rows[0]['images']} VOC images, batch {args.batch_size}, {args.workers} decode workers, "
          f"median of {args.repeats}, {os.cpu_count()} cores")
    print(f"{'backend':<14}{'end-to-end img/s':>18}{'inference img/s':>18}{'e2e ratio':>11}")
    for row in rows:
        row["end_to_end_ratio"] = row["end_to_end_img_per_s"] / reference
        print(f"{row['backend']:<14}{row['end_to_end_img_per_s']:>18.1f}{row['inference_img_per_s']:>18.1f}"
              f"{row['end_to_end_ratio']:>10.2f}x")
    write_text_atomic(args.json, json.dumps({"model": model.name, "date": date.today().isoformat(),
                                             "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                             "batch_size": args.batch_size, "workers": args.workers,
                                             "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
