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
from utils.errors import EXIT_OK, EXIT_SOME_INPUTS_FAILED
from utils.pipeline import DECODE_NAMES, default_workers
from utils.run import open_executor
from utils.runtime import BACKENDS
from utils.voc import evaluate, mean_ap

log = logging.getLogger("voc_evaluation")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("backend", nargs="?", choices=("auto", *BACKENDS), default="auto",
                        help="the backend to evaluate (default auto: tensorrt with a GPU and TensorRT, else "
                             "onnxruntime, else tensorflow; an engine always runs on tensorrt)")
    cli.add_source_args(parser)
    cli.add_run_args(parser, batch_size=64)
    cli.add_voc_args(parser)
    parser.add_argument("--split", default="test", help="ImageSets/Main/<split>.txt (default test)")
    parser.add_argument("-j", "--workers", type=int, default=None,
                        help="decode/resize worker threads (default: one per core)")
    parser.add_argument("-f", "--force", action="store_true", help="run the detector even if cached results match")
    parser.add_argument("--compare", choices=BACKENDS, help="also evaluate this backend (same model) and compare")
    parser.add_argument("--tolerance", type=float, default=0.5,
                        help="largest |mAP difference| in AP points that --compare accepts (default 0.5)")
    parser.add_argument("--plot", action="store_true", help="write a PR-curve PNG into the results folder")
    cli.add_ray_args(parser)
    args = parser.parse_args(argv)
    cli.check_decode_arg(parser, args)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.workers is None:
        args.workers = default_workers()
    return args


def evaluate_plan(plan, args, dataset):
    """Detections of one plan (run or cached) -> (ClassAp list, RunStats, artifact, results folder)."""
    artifact = plan.prepare()
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
    return evaluate(dataset, detections), stats, artifact, folder


def print_report(plan, artifact, args, dataset, results, stats, detectable) -> float:
    score = mean_ap(results, detectable)
    print(f"\nVOC2007 {dataset.split}: {stats.images} images, model {artifact.model}, backend {plan.backend} "
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging()
    with cli.user_errors():
        cli.check_ray(args)
        plans = [cli.plan_from_args(args)]
        if args.compare and args.compare != plans[0].backend:
            other = argparse.Namespace(**{**vars(args), "backend": args.compare})
            if args.compare == "tensorflow":   # the reference runs the frozen graph as exported
                other.precision, other.flavour = None, "auto"
            plans.append(cli.plan_from_args(other))
        dataset = cli.voc_dataset(args, args.split)
        reports = []
        for plan in plans:
            results, stats, artifact, folder = evaluate_plan(plan, args, dataset)
            detectable = ev.detectable_classes(artifact.labels)
            ev.log_skipped(dataset, stats)
            score = print_report(plan, artifact, args, dataset, results, stats, detectable)
            if args.plot:
                path = ev.plot_pr_curves(results, detectable, f"{artifact.model} — {plan.backend} {artifact.precision}",
                                         folder / f"pr_curves_{dataset.split}.png")
                print(f"Saved PR curves to: {path}")
            reports.append((plan.backend, results, score, stats, detectable))
        failures = len(dataset.skipped) + len(reports[0][3].failed)
        if failures:
            log.info(f"{failures} of {failures + reports[0][3].images} images skipped (see warnings)")
        if len(reports) == 2:
            (name, ours, our_map, _, detectable), (their_name, theirs, their_map, _, _) = reports
            delta = (our_map - their_map) * 100
            print(f"\n{name} vs {their_name}:")
            print("\n".join(ev.compare_lines(ours, theirs, name, their_name, detectable)))
            verdict = "within" if abs(delta) <= args.tolerance else "OUTSIDE"
            print(f"mAP {our_map:.4f} vs {their_map:.4f}: delta {delta:+.2f} points, {verdict} the tolerance "
                  f"of {args.tolerance} points")
            if abs(delta) > args.tolerance:
                return EXIT_SOME_INPUTS_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
