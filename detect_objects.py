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
import re
import sys
import time
from pathlib import Path

from utils import cli
from utils.coco import ImageIds
from utils.draw import draw_detections, percent
from utils.errors import EXIT_OK, EXIT_SOME_INPUTS_FAILED, ImageError, UserError
from utils.files import atomic_path, check_writable_file, check_writable_folder, os_reason, write_text_atomic
from utils.labels import label_name
from utils.pipeline import default_workers
from utils.run import coco_results, collect_images, open_executor
from utils.runtime import BACKENDS

log = logging.getLogger("detect_objects")
OUTPUT_SUFFIX = "_inferred"
EARLIER_RESULT = re.compile(rf".*{OUTPUT_SUFFIX}(_\d+)?\.jpg", re.IGNORECASE)  # what output_paths names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files or folders of images")
    cli.add_source_args(parser)
    parser.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                        help="auto (default) = tensorrt with a GPU and TensorRT, else onnxruntime with CUDA, else "
                             "openvino (BF16 on a CPU with BF16 arithmetic), else onnxruntime, else tensorflow; an "
                             "engine always runs on tensorrt")
    cli.add_run_args(parser, batch_size=1)
    parser.add_argument("-t", "--threshold", type=float, default=0.5,
                        help="confidence to show a detection (default 0.5)")
    parser.add_argument("-o", "--output", type=Path,
                        help="annotated image to write (one input, a .jpg or .png name; default image_inferred.jpg) "
                             "or folder (several inputs, or a name without suffix; default WORKSPACE/detections). "
                             "Inputs are never overwritten: a name taken in the run gets _2, _3, ...")
    parser.add_argument("--json", type=Path, help="write all detections above the threshold as COCO results JSON")
    parser.add_argument("--coco-annotations", type=Path, metavar="FILE",
                        help="with --json: image_id = the id this COCO annotation file gives the input's file name "
                             "(default: the file stem when it is all digits, else a stable integer with file_name)")
    cli.add_ray_args(parser)
    args = parser.parse_args(argv)
    if not 0.0 <= args.threshold <= 1.0:
        parser.error("--threshold must be between 0 and 1")
    if args.coco_annotations and not args.json:
        parser.error("--coco-annotations needs --json")
    return args


def _same(path: Path) -> str:
    """What two paths naming the same file have in common."""
    return str(Path(path).resolve())


def _writable_image_suffix(suffix: str) -> bool:
    from PIL import Image  # noqa: PLC0415

    Image.init()
    return Image.registered_extensions().get(suffix.lower()) in Image.SAVE


def output_folder(output: Path | None, single: bool, workspace: Path) -> Path | None:
    """The folder the annotated images go to; None when one input goes to one file."""
    if single and output is not None and not output.is_dir() and output.suffix:
        return None
    if single and output is None:
        return None
    return output if output is not None else workspace / "detections"


def output_paths(files: list[Path], output: Path | None, folder: Path | None) -> list[Path]:
    """The annotated image of every input, in input order: never an input, unique within the run
    (``person_inferred.jpg``, then ``person_inferred_2.jpg``, ...)."""
    inputs = {_same(path) for path in files}
    if folder is None and output is not None:
        if _same(output) in inputs:
            raise UserError(f"-o '{output}' is the input image itself; choose another output file")
        if not _writable_image_suffix(output.suffix):
            raise UserError(f"-o '{output}': Pillow cannot write '{output.suffix}' images; give a .jpg or .png "
                            f"name, or a folder")
        return [output]
    taken, targets = set(inputs), []
    for path in files:
        first = folder / f"{path.stem}{OUTPUT_SUFFIX}.jpg" if folder is not None else Path("image_inferred.jpg")
        target, number = first, 1
        while _same(target) in taken:
            number += 1
            target = first.with_name(f"{first.stem}_{number}{first.suffix}")
        taken.add(_same(target))
        targets.append(target)
    return targets


def skip_earlier_results(files: list[Path], arguments: list[str], folder: Path | None) -> list[Path]:
    """When the output folder is also an input folder, its earlier results are not inputs (one warning)."""
    if folder is None or not any(Path(arg).is_dir() and _same(Path(arg)) == _same(folder) for arg in arguments):
        return files
    kept = [path for path in files if _same(path.parent) != _same(folder) or not EARLIER_RESULT.fullmatch(path.name)]
    log.warning(f"the output folder '{folder}' is also an input folder: the annotated images go beside the inputs "
                f"and {len(files) - len(kept)} earlier results there (*{OUTPUT_SUFFIX}.jpg) are not taken as inputs")
    return kept


def check_targets(args: argparse.Namespace, files: list[Path], targets: list[Path] | None,
                  folder: Path | None) -> None:
    """Refuse before the run, in one line, an output that could not be written after it."""
    inputs = {_same(path) for path in files}
    if targets is not None:
        if folder is not None:
            check_writable_folder(folder, "-o/--output")
        elif targets:
            check_writable_file(targets[0], "-o/--output")
    if args.json:
        if _same(args.json) in inputs or (targets and _same(args.json) in {_same(t) for t in targets}):
            raise UserError(f"--json '{args.json}' is an input or an annotated image of this run; choose another file")
        check_writable_file(args.json, "--json")


def _draw(result, shown, labels, target: Path) -> str | None:
    """Write the annotated image of ``result`` to ``target``; the one-line reason when it cannot."""
    from utils.preprocess import load_image  # noqa: PLC0415

    try:
        image, in_place = result.image, False
        if image is None:                       # decoded reduced, or too large to keep: read it again
            image, in_place = load_image(result.path), True
        with atomic_path(target) as tmp:
            draw_detections(image, shown, labels, in_place).save(tmp)
    except ImageError as exc:
        return str(exc)
    except (OSError, ValueError, KeyError) as exc:
        return f"cannot write '{target}': {os_reason(exc)}"
    return None


def detect(args: argparse.Namespace, files: list[Path], targets: list[Path] | None, failures: list) -> list[dict]:
    """Detect in every file, print what was found, draw it (not on Ray); returns the COCO results."""
    ids = ImageIds(files, args.coco_annotations)     # read before the model: a bad file fails fast
    plan = cli.plan_from_args(args)
    artifact = plan.prepare()
    labels = artifact.labels
    coco, on_cpu = [], []
    position = 0
    with open_executor(plan, artifact, workers=default_workers(), ray=args.ray, ray_workers=args.ray_workers) as run:
        print("\n".join(run.settings()) + "\n", flush=True)
        for batch in run.batches(files, keep_images=not args.ray):
            for result in batch.results:
                target = targets[position] if targets is not None else None
                position += 1
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
                    print(f"Detected {label_name(labels, int(row[1]))} with confidence {percent(row[2])}%")
                if not len(shown):
                    print(f"No objects above {args.threshold:g}")
                coco.extend(coco_results(result.path, result.rows, result.size, args.threshold, ids))
                if target is None:                          # Ray: detections only
                    continue
                problem = _draw(result, shown, labels, target)
                if problem:
                    log.error(problem)
                    failures.append(result)
                    continue
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
    failures: list = []
    with cli.user_errors():
        cli.check_workspace(args.workspace)
        inputs = collect_images(args.inputs)
        single = len(inputs.files) == 1 and not inputs.errors and not Path(args.inputs[0]).is_dir()
        if args.output and not single and args.output.suffix.lower() in (".jpg", ".jpeg", ".png"):
            raise UserError(f"{len(inputs.files)} images need an output folder, not the file {args.output}")
        files, targets, folder = inputs.files, None, None
        if not args.ray:
            folder = output_folder(args.output, single, args.workspace)
            files = skip_earlier_results(files, args.inputs, folder)
            targets = output_paths(files, args.output, folder)
        check_targets(args, files, targets, folder)
        cli.check_ray(args)
        failures.extend(inputs.errors)
        for failure in inputs.errors:
            log.error(failure.error)
        if not files and not inputs.errors:
            raise UserError(f"nothing to detect: the inputs hold only earlier results (*{OUTPUT_SUFFIX}.jpg)",
                            EXIT_SOME_INPUTS_FAILED)
        coco = detect(args, files, targets, failures) if files else []
        if args.json:
            try:
                write_text_atomic(args.json, json.dumps(coco, indent=1))
            except OSError as exc:
                raise UserError(f"cannot write --json '{args.json}': {os_reason(exc)}") from None
            print(f"Saved {len(coco)} detections to: {args.json}")
    if failures:
        log.info(f"{len(failures)} of {len(files) + len(inputs.errors)} inputs failed")
        return EXIT_SOME_INPUTS_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
