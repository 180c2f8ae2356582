#!/usr/bin/env python3
"""COCO bbox AP of a backend through pycocotools (the standard 12-number summary), optionally side by
side with another backend. Runs from a model (-m), a converted ONNX (--onnx) or an engine (--engine) on
a COCO-format image folder and annotation file; with a file, TensorFlow is never imported.

Only the annotation file's categories that the model detects are evaluated (same id and name as one of
its labels: COCO ids for COCO models); images that cannot be read leave the ground truth too.

Examples:
  python eval_coco.py onnxruntime -m ssd_inception_v2_coco_2017_11_17 -i val2017 -a annotations/instances_val2017.json
  python -m utils.coco voc2coco ../shared/data/VOCdevkit/VOC2007 voc2007_test.json
  python eval_coco.py onnxruntime -m ssdlite_mobilenet_v2_pedestrian -i ../shared/data/VOCdevkit/VOC2007/JPEGImages \\
      -a voc2007_test.json --compare tensorflow
"""

import argparse
import json
import logging
import sys
from pathlib import Path

from utils import cli
from utils import coco
from utils import evaluation as ev
from utils.errors import EXIT_SOME_INPUTS_FAILED, UserError
from utils.files import write_text_atomic
from utils.pipeline import DECODE_NAMES
from utils.run import open_executor

log = logging.getLogger("eval_coco")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_evaluation_args(parser, "AP (IoU 0.50:0.95)")
    parser.add_argument("-i", "--images", type=Path, required=True, metavar="DIR",
                        help="the image folder the annotation file's file names are relative to")
    parser.add_argument("-a", "--annotations", type=Path, required=True, metavar="FILE",
                        help="COCO annotation file (instances_*.json, or one from python -m utils.coco voc2coco)")
    parser.add_argument("--limit", type=int, default=None, help="the annotation file's first N images only")
    args = parser.parse_args(argv)
    cli.check_evaluation_args(parser, args)
    return args


def run_plan(plan, args, ground_truth, images: list[dict]):
    """Detections of one plan on the images -> (artifact, categories evaluated, results entries, RunStats,
    the results JSON written)."""
    artifact = plan.prepare()
    categories = coco.detectable_categories(ground_truth, artifact.labels)
    if not categories:
        names = ", ".join(f"{name} ({label})" for label, name in sorted(artifact.labels.items()))
        raise UserError(f"none of the model's classes ({names}) is a category of {args.annotations} "
                        f"(same id and name)")
    results: list[dict] = []

    def collect(result) -> None:
        results.extend(coco.result_entries(int(result.key), result.rows, result.size))

    paths = [args.images / image["file_name"] for image in images]
    keys = [str(image["id"]) for image in images]
    with open_executor(plan, artifact, workers=args.workers, ray=args.ray, ray_workers=args.ray_workers) as executor:
        for line in executor.settings():
            log.info(line)
        stats = ev.detect_images(executor, paths, keys, collect, plan.decode, f"{executor.name} {artifact.precision}")
    folder = ev.results_dir(args.workspace, artifact.model, plan.backend, artifact.flavour, artifact.precision)
    saved = folder / f"coco_{args.annotations.stem}.json"
    write_text_atomic(saved, json.dumps(results))
    return artifact, categories, results, stats, saved


def print_report(plan, artifact, args, summary: coco.CocoSummary, stats: ev.RunStats, ground_truth, saved: Path,
                 count: int) -> None:
    names = {category["id"]: category["name"] for category in ground_truth.dataset["categories"]}
    shown = ", ".join(names[category] for category in summary.categories[:8])
    more = f", ... ({len(summary.categories)})" if len(summary.categories) > 8 else ""
    print(f"\nCOCO bbox on {args.annotations.name}: {summary.images} images, categories {shown}{more}; "
          f"model {artifact.model}, backend {plan.backend} {artifact.precision}"
          + (f" ({artifact.flavour})" if artifact.flavour else ""))
    print("\n".join(summary.lines))
    print(f"End to end: {stats.end_to_end_fps:.1f} images/s; inference only: {stats.inference_fps:.1f} images/s "
          f"(batch {plan.batch_size}, {args.workers} read/decode workers); image decode: {DECODE_NAMES[stats.decode]}")
    print(f"Saved {count} detections (COCO results) to: {saved}")


def compare_lines(ours: coco.CocoSummary, theirs: coco.CocoSummary, our_name: str, their_name: str) -> list[str]:
    """The 12 summary numbers of two backends side by side, with the difference in points."""
    lines = [f"{'metric':<6}  {our_name:>12}  {their_name:>12}  {'delta (pts)':>11}"]
    for name in coco.SUMMARY_NAMES:
        mine, other = ours.value(name), theirs.value(name)
        if ev.is_nan(mine) or ev.is_nan(other):
            lines.append(f"{name:<6}  {'n/a' if ev.is_nan(mine) else f'{mine:.4f}':>12}  "
                         f"{'n/a' if ev.is_nan(other) else f'{other:.4f}':>12}  {'':>11}")
        else:
            lines.append(f"{name:<6}  {mine:>12.4f}  {other:>12.4f}  {round((mine - other) * 100, 2) + 0.0:>+11.2f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging()
    with cli.user_errors():
        cli.check_ray(args)
        if not args.images.is_dir():
            raise UserError(f"image folder not found: {args.images} (pass -i/--images)")
        ground_truth = coco.load_ground_truth(args.annotations)
        images = ground_truth.dataset["images"][:args.limit]
        if not images:
            log.error(f"no image to evaluate: {args.annotations} lists none")
            return EXIT_SOME_INPUTS_FAILED
        plans = ev.plans_to_compare(args)
        runs = [(plan, *run_plan(plan, args, ground_truth, images)) for plan in plans]
        unreadable = {int(key) for *_, stats, _ in runs for key in stats.failed_ids}
        for reason in dict.fromkeys(reason for *_, stats, _ in runs for reason in stats.failed):
            log.warning(f"skipped {reason}")
        # An image that could not be read leaves the ground truth too (for every backend compared).
        evaluated = [image["id"] for image in images if image["id"] not in unreadable]
        reports, problems = [], []
        for plan, artifact, categories, results, stats, saved in runs:
            kept = [entry for entry in results if entry["image_id"] not in unreadable]
            summary = coco.evaluate(ground_truth, kept, evaluated, categories)
            print_report(plan, artifact, args, summary, stats, ground_truth, saved, len(results))
            reports.append((plan.backend, summary))
            if evaluated and ev.is_nan(summary.value("AP")):
                problems.append(f"{plan.backend}: AP is NaN: none of the {len(evaluated)} evaluated images has "
                                f"ground truth (not iscrowd) of the categories the model detects")
        if unreadable:
            log.info(f"{len(unreadable)} of {len(images)} images skipped (see warnings); their ground truth is "
                     f"left out of the AP")
        passed = True
        if len(reports) == 2:
            (name, ours), (their_name, theirs) = reports
            print(f"\n{name} vs {their_name}:")
            print("\n".join(compare_lines(ours, theirs, name, their_name)))
            verdict, passed = ev.comparison(ours.value("AP"), theirs.value("AP"), args.tolerance, "AP")
            print(verdict)
        if not evaluated:
            problems = [f"no image could be evaluated: all {len(images)} images were skipped (see warnings)"]
        return ev.exit_code(problems, passed)


if __name__ == "__main__":
    sys.exit(main())
