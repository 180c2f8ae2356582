#!/usr/bin/env python3
"""Detect objects in images with an SSD model and draw labelled boxes on them.

The model is a TF Object Detection API SSD (-m, converted and built as needed), a converted ONNX
file (--onnx, from model.py) or a TensorRT engine (--engine, from build_engine.py); with a file,
TensorFlow is never imported.

Examples:
  python detect_objects.py images/person.jpg
  python detect_objects.py images/ -b 4 --json detections.json
  python detect_objects.py images/ --onnx workspace/models/ssdlite_mobilenet_v2_pedestrian/ssdlite_mobilenet_v2_pedestrian_portable_FP32.onnx
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from utils import cli
from utils.draw import draw_detections
from utils.errors import EXIT_OK, EXIT_SOME_INPUTS_FAILED, UserError
from utils.files import atomic_path, write_text_atomic
from utils.labels import label_name
from utils.pipeline import default_workers
from utils.run import coco_results, collect_images, open_executor
from utils.runtime import BACKENDS

log = logging.getLogger("detect_objects")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files or folders of images")
    cli.add_source_args(parser)
    parser.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                        help="auto (default) = tensorrt with a GPU and TensorRT, else onnxruntime, else tensorflow; "
                             "an engine always runs on tensorrt")
    cli.add_run_args(parser, batch_size=1)
    parser.add_argument("-t", "--threshold", type=float, default=0.5,
                        help="confidence to show a detection (default 0.5)")
    parser.add_argument("-o", "--output", type=Path,
                        help="annotated image to write (one input; default image_inferred.jpg) or folder "
                             "(several inputs; default WORKSPACE/detections)")
    parser.add_argument("--json", type=Path, help="write all detections above the threshold as COCO results JSON")
    cli.add_ray_args(parser)
    args = parser.parse_args(argv)
    cli.check_decode_arg(parser, args)
    if not 0.0 <= args.threshold <= 1.0:
        parser.error("--threshold must be between 0 and 1")
    return args


def output_path_for(image_path: Path, output: Path | None, single: bool, workspace: Path) -> Path:
    if single:
        return output or Path("image_inferred.jpg")
    folder = output or workspace / "detections"
    return folder / f"{image_path.stem}_inferred.jpg"


def detect(args: argparse.Namespace, files: list[Path], single: bool, failures: list) -> list[dict]:
    """Detect in every file, print what was found, draw it (not on Ray); returns the COCO results."""
    plan = cli.plan_from_args(args)
    artifact = plan.prepare()
    labels = artifact.labels
    coco, on_cpu = [], []
    with open_executor(plan, artifact, workers=default_workers(), ray=args.ray, ray_workers=args.ray_workers) as run:
        print("\n".join(run.settings()) + "\n", flush=True)
        for batch in run.batches(files, keep_images=not args.ray):
            for result in batch.results:
                if result.cpu_reason:                       # decode gpu: the CPU decoded this one
                    on_cpu.append(result)
                if result.error:
                    log.error(result.error)
                    failures.append(result)
                    continue
                started = time.perf_counter()
                shown = result.rows[result.rows[:, 2] >= args.threshold]
                if len(files) > 1:
                    print(f"{result.path}:")
                for row in shown:
                    print(f"Detected {label_name(labels, int(row[1]))} with confidence {int(row[2] * 100)}%")
                coco.extend(coco_results(result.path, result.rows, result.size, args.threshold))
                if result.image is None:                    # Ray: detections only
                    continue
                target = output_path_for(result.path, args.output, single, args.workspace)
                try:
                    with atomic_path(target) as tmp:
                        draw_detections(result.image, shown, labels).save(tmp)
                except (OSError, ValueError) as exc:
                    raise UserError(f"cannot write '{target}': {exc}; choose another -o/--output") from exc
                count = max(batch.detected, 1)
                per_image = batch.seconds * 1000 / count + (time.perf_counter() - started) * 1000
                batch_note = f" (batch of {count})" if count > 1 else ""
                print(f"{run.name} inference time: {batch.inference_seconds * 1000:.0f} ms{batch_note}")
                print(f"Total time taken for one image: {per_image:.0f} ms")
                print(f"Saved output image to: {target}\n", flush=True)
        folder = getattr(run, "folder", None)
        if folder:
            print(f"Shards and merged detections (JSON lines) in: {folder}")
    if on_cpu:
        print(f"{len(on_cpu)} of {len(files)} images decoded on the CPU instead of the GPU: "
              + "; ".join(f"{result.path.name} ({result.cpu_reason})" for result in on_cpu[:5])
              + (" ..." if len(on_cpu) > 5 else ""))
    return coco


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging()
    inputs = collect_images(args.inputs)
    single = len(inputs.files) == 1 and not inputs.errors and not Path(args.inputs[0]).is_dir()
    if args.output and not single and args.output.suffix.lower() in (".jpg", ".jpeg", ".png"):
        log.error(f"{len(inputs.files)} images need an output folder, not the file {args.output}")
        return 2
    failures = list(inputs.errors)
    for failure in inputs.errors:
        log.error(failure.error)
    with cli.user_errors():
        cli.check_ray(args)
        coco = detect(args, inputs.files, single, failures) if inputs.files else []
        if args.json:
            write_text_atomic(args.json, json.dumps(coco, indent=1))
            print(f"Saved {len(coco)} detections to: {args.json}")
    if failures:
        log.info(f"{len(failures)} of {len(inputs.files) + len(inputs.errors)} inputs failed")
        return EXIT_SOME_INPUTS_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
