#!/usr/bin/env python3
"""Detect objects in images with an SSD model and draw labelled boxes on them.

Examples:
  python detect_objects.py images/person.jpg
  python detect_objects.py images/ -b 4 --json detections.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from utils import cli
from utils.backends import BACKENDS, create_backend
from utils.detection import InputList, collect_images, coco_results, detect_images
from utils.converter import cache_key, check_options
from utils.draw import draw_detections
from utils.errors import EXIT_OK, EXIT_SOME_INPUTS_FAILED, UserError
from utils.files import atomic_path, write_text_atomic
from utils.labels import label_map_for, label_name
from utils.models import resolve_model
from utils.pipeline import DECODE_NAMES, default_workers, resolve_decode


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files or folders of images")
    cli.add_model_args(parser)
    parser.add_argument("-b", "--max-batch-size", type=int, default=1, help="images per inference batch (default 1)")
    parser.add_argument("-p", "--precision", choices=("FP32", "FP16", "INT8"), default="FP32",
                        help="inference precision (FP32 in this release)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="auto = the best installed (onnxruntime, then tensorflow)")
    parser.add_argument("-t", "--threshold", type=float, default=0.5,
                        help="confidence to show a detection (default 0.5)")
    parser.add_argument("-o", "--output", type=Path,
                        help="annotated image to write (one input; default image_inferred.jpg) or folder "
                             "(several inputs; default WORKSPACE/detections)")
    parser.add_argument("--json", type=Path, help="write all detections above the threshold as COCO results JSON")
    cli.add_flavour_arg(parser)
    cli.add_decode_arg(parser)
    cli.add_trt_module_arg(parser)
    cli.add_nms_args(parser)
    cli.add_ray_args(parser)
    args = parser.parse_args(argv)
    cli.check_decode_arg(parser, args)
    if args.max_batch_size < 1:
        parser.error("--max-batch-size must be at least 1")
    if not 0.0 <= args.threshold <= 1.0:
        parser.error("--threshold must be between 0 and 1")
    return args


def output_path_for(image_path: Path, output: Path | None, single: bool, workspace: Path) -> Path:
    if single:
        return output or Path("image_inferred.jpg")
    folder = output or workspace / "detections"
    return folder / f"{image_path.stem}_inferred.jpg"


def detect_here(args: argparse.Namespace, inputs: InputList, single: bool, failures: list) -> list[dict]:
    """Detect in this process, drawing each image; returns the COCO results."""
    coco = []
    model = resolve_model(args.model, args.workspace)
    backend = create_backend(args.backend, model, args.precision, args.max_batch_size,
                             cli.nms_overrides(args), cli.log, args.flavour)
    decode = resolve_decode(args.decode, backend)
    print("\n".join(backend.settings() + [f"  * Image decode - {DECODE_NAMES[decode]}"]) + "\n", flush=True)
    labels = label_map_for(model.labels, backend.spec.num_classes)
    on_cpu = []
    for result in detect_images(backend, inputs.files, args.max_batch_size, decode, default_workers()):
        if result.cpu_reason:                       # decode gpu: the CPU decoded this one
            on_cpu.append(result)
        if result.error:
            cli.log(f"error: {result.error}")
            failures.append(result)
            continue
        started = time.perf_counter()
        shown = result.rows[result.rows[:, 2] >= args.threshold]
        if len(inputs.files) > 1:
            print(f"{result.path}:")
        for row in shown:
            print(f"Detected {label_name(labels, int(row[1]))} with confidence {int(row[2] * 100)}%")
        target = output_path_for(result.path, args.output, single, args.workspace)
        try:
            with atomic_path(target) as tmp:
                draw_detections(result.image, shown, labels).save(tmp)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot write '{target}': {exc}; choose another -o/--output") from exc
        coco.extend(coco_results(result.path, result.rows, result.image.size, args.threshold))
        per_image = result.total_ms / result.batch_size + (time.perf_counter() - started) * 1000
        batch_note = f" (batch of {result.batch_size})" if result.batch_size > 1 else ""
        print(f"{backend.name} inference time: {result.inference_ms:.0f} ms{batch_note}")
        print(f"Total time taken for one image: {per_image:.0f} ms")
        print(f"Saved output image to: {target}\n", flush=True)
    if on_cpu:
        print(f"{len(on_cpu)} of {len(inputs.files)} images decoded on the CPU instead of the GPU: "
              + "; ".join(f"{result.path.name} ({result.cpu_reason})" for result in on_cpu[:5])
              + (" ..." if len(on_cpu) > 5 else ""))
    return coco


def detect_on_ray(args: argparse.Namespace, files: list[Path], failures: list) -> list[dict]:
    """Detect on a Ray cluster (utils.distributed); prints the detections, draws nothing; returns the COCO results."""
    from utils import distributed  # noqa: PLC0415

    distributed.import_ray()
    model = resolve_model(args.model, args.workspace)
    config = distributed.DetectorConfig(args.backend, model, args.precision, args.max_batch_size,
                                        cli.nms_overrides(args), args.flavour)
    keys = [str(path) for path in files]
    key = {"inputs": distributed.input_key(keys, files), "backend": args.backend, "batch": args.max_batch_size,
           "model": cache_key(model, args.flavour or "portable", args.precision, cli.nms_overrides(args))}
    distributed.connect(cli.ray_address(args))
    run = distributed.run(keys, files, config, distributed.run_folder(args.workspace, key), key,
                          args.ray_workers, cli.log)
    labels = label_map_for(model.labels, run.num_classes)
    coco = []
    for record in run.records:
        if record.error:
            cli.log(f"error: {record.error}")
            failures.append(record)
            continue
        rows = np.array(record.rows, dtype=np.float32).reshape(-1, 7)
        print(f"{record.path}:")
        for row in rows[rows[:, 2] >= args.threshold]:
            print(f"Detected {label_name(labels, int(row[1]))} with confidence {int(row[2] * 100)}%")
        coco.extend(coco_results(Path(record.path), rows, tuple(record.size), args.threshold))
    print(f"Shards and merged detections (JSON lines) in: {run.folder}")
    return coco


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    inputs = collect_images(args.inputs)
    single = len(inputs.files) == 1 and not inputs.errors and not Path(args.inputs[0]).is_dir()
    if args.output and not single and args.output.suffix.lower() in (".jpg", ".jpeg", ".png"):
        cli.log(f"error: {len(inputs.files)} images need an output folder, not the file {args.output}")
        return 2
    failures = list(inputs.errors)
    cli.apply_trt_module(args)
    with cli.user_errors():
        check_options(args.flavour or "portable", args.precision)
        if args.ray:
            coco = detect_on_ray(args, inputs.files, failures)
        else:
            coco = detect_here(args, inputs, single, failures)
        if args.json:
            write_text_atomic(args.json, json.dumps(coco, indent=1))
            print(f"Saved {len(coco)} detections to: {args.json}")
    if failures:
        cli.log(f"{len(failures)} of {len(inputs.files) + len(inputs.errors)} inputs failed")
        return EXIT_SOME_INPUTS_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
