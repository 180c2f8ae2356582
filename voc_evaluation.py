#!/usr/bin/env python3
"""VOC2007 AP / mAP of a backend, optionally side by side with another (is the optimised graph as
accurate as TensorFlow?). Runs from a model (-m), a converted ONNX (--onnx) or an engine (--engine);
with a file, TensorFlow is never imported.

Examples:
  python voc_evaluation.py onnxruntime -m ssdlite_mobilenet_v2_pedestrian -d ../shared/data/VOCdevkit/VOC2007
  python voc_evaluation.py onnxruntime -m ssdlite_mobilenet_v2_pedestrian -d ../shared/data/VOCdevkit/VOC2007 \\
      --compare tensorflow --limit 100 --plot
  python voc_evaluation.py --onnx model.onnx -d ../shared/data/VOCdevkit/VOC2007
"""

import argparse
import logging
import sys

from utils import cli
from utils import evaluation as ev
from utils.errors import EXIT_SOME_INPUTS_FAILED
from utils.pipeline import DECODE_NAMES
from utils.run import open_executor
from utils.voc import evaluate, mean_ap

log = logging.getLogger("voc_evaluation")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_evaluation_args(parser, "mAP")
    cli.add_voc_args(parser)
    parser.add_argument("--split", default="test", help="ImageSets/Main/<split>.txt (default test)")
    parser.add_argument("-f", "--force", action="store_true", help="run the detector even if cached results match")
    parser.add_argument("--plot", action="store_true", help="write a PR-curve PNG into the results folder")
    args = parser.parse_args(argv)
    cli.check_evaluation_args(parser, args)
    return args


def run_plan(plan, args, dataset):
    """Detections of one plan (run, or cached when run.json and its result files match) -> (artifact,
    results folder, detections by class, RunStats)."""
    artifact = plan.prepare(warn=False)
    ev.check_detectable(artifact.labels, artifact.model, artifact.spec.num_classes)   # before any detection
    folder = ev.results_dir(args.workspace, artifact.model, plan.backend, artifact.flavour, artifact.precision)
    key = ev.run_key(dataset, plan.key(artifact))
    cached = None if args.force else ev.load_cached(folder, dataset.split, key)
    if cached is None:
        with open_executor(plan, artifact, workers=args.workers, ray=args.ray, ray_workers=args.ray_workers,
                           fresh=args.force) as executor:
            for line in executor.settings():
                log.info(line)
            detections, stats = ev.run_detections(executor, dataset, artifact.labels, plan.decode,
                                                  f"{executor.name} {artifact.precision}")
        detections = ev.save_detections(folder, dataset.split, key, detections, stats)
    else:
        log.info(f"Using cached {plan.backend} detections from {folder} (-f to run again)")
        detections, stats = cached
    return artifact, folder, detections, stats


def print_report(plan, artifact, args, dataset, results, stats, detectable) -> float:
    score = mean_ap(results, detectable)
    print(f"\nVOC2007 {dataset.split}: {len(dataset.images)} images, model {artifact.model}, backend {plan.backend} "
          f"{artifact.precision}" + (f" ({artifact.flavour})" if artifact.flavour else ""))
    print("\n".join(ev.ap_lines(results, detectable)))
    undetectable = [r.name for r in results if r.name not in detectable]
    if undetectable:
        print(f"n/a: {len(undetectable)} classes this model cannot detect, excluded from mAP")
    print(f"mAP: {score:.4f}")
    if stats.cached:
        print(f"(detections reused from an earlier run: {stats.end_to_end_fps:.1f} images/s end to end, "
              f"{stats.inference_fps:.1f} images/s inference only)")
    else:
        print(f"End to end: {stats.end_to_end_fps:.1f} images/s; inference only: {stats.inference_fps:.1f} images/s "
              f"(batch {plan.batch_size}, {args.workers} read/decode workers)")
    print(f"Image decode: {DECODE_NAMES[stats.decode]}" + (f"; {stats.cpu_decoded} images decoded on the CPU "
                                                           f"instead (not JPEG, CMYK, ...)" if stats.cpu_decoded else ""))
    return score


def undefined_ap(backend, results, score, detectable, dataset) -> str | None:
    """Why an AP or the mAP of a backend is NaN (the gate refuses it), or None."""
    nan_classes = [r.name for r in results if r.name in detectable and ev.is_nan(r.ap)]
    if nan_classes:
        return f"{backend}: AP of {', '.join(nan_classes)} is NaN"
    if ev.is_nan(score):
        if not detectable:
            return f"{backend}: mAP is NaN: the model detects no VOC class"
        return (f"{backend}: mAP is NaN: none of the {len(dataset.images)} evaluated images has non-difficult "
                f"ground truth of the classes the model detects ({', '.join(sorted(detectable))})")
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging()
    with cli.user_errors():
        cli.check_ray(args)
        plans = ev.plans_to_compare(args)
        dataset = cli.voc_dataset(args, args.split)
        total = len(dataset.images) + len(dataset.skipped)
        for reason in dataset.skipped:
            log.warning(f"skipped {reason}")
        if not dataset.images:
            log.error(f"no image to evaluate: all {total} images of {dataset.root} ({dataset.split}) were skipped")
            return EXIT_SOME_INPUTS_FAILED
        runs = [(plan, *run_plan(plan, args, dataset)) for plan in plans]
        unreadable = list(dict.fromkeys(key for *_, stats in runs for key in stats.failed_ids))
        for reason in dict.fromkeys(reason for *_, stats in runs for reason in stats.failed):
            log.warning(f"skipped {reason}")
        # An image that could not be read leaves the ground truth too (for every backend compared).
        evaluated = dataset.without(unreadable)
        reports, problems = [], []
        for plan, artifact, folder, detections, stats in runs:
            results = evaluate(evaluated, detections)
            detectable = ev.detectable_classes(artifact.labels)
            score = print_report(plan, artifact, args, evaluated, results, stats, detectable)
            if args.plot:
                path = ev.plot_pr_curves(results, detectable, f"{artifact.model} — {plan.backend} {artifact.precision}",
                                         folder / f"pr_curves_{dataset.split}.png")
                print(f"Saved PR curves to: {path}")
            reports.append((plan.backend, results, score, detectable))
            if evaluated.images:
                problems.append(undefined_ap(plan.backend, results, score, detectable, evaluated))
        failures = len(dataset.skipped) + len(unreadable)
        if failures:
            log.info(f"{failures} of {total} images skipped (see warnings); their ground truth is left out of the AP")
        passed = True
        if len(reports) == 2:
            (name, ours, our_map, detectable), (their_name, theirs, their_map, _) = reports
            print(f"\n{name} vs {their_name}:")
            print("\n".join(ev.compare_lines(ours, theirs, name, their_name, detectable)))
            verdict, passed = ev.comparison(our_map, their_map, args.tolerance)
            print(verdict)
        if not evaluated.images:
            problems = [f"no image could be evaluated: {failures} of {total} images were skipped (see warnings)"]
        return ev.exit_code(problems, passed)


if __name__ == "__main__":
    sys.exit(main())
