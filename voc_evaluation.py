#!/usr/bin/env python3
"""VOC2007 AP / mAP of a backend, optionally side by side with another (is the optimised graph as
accurate as TensorFlow?).

Examples:
  python voc_evaluation.py onnxruntime -m ssdlite_mobilenet_v2_pedestrian -d ../shared/data/VOCdevkit/VOC2007
  python voc_evaluation.py onnxruntime --compare tensorflow --limit 100 --plot
"""

import argparse
import shutil
import sys
import time

import numpy as np

from utils import cli
from utils import evaluation as ev
from utils.backends import BACKENDS, create_backend
from utils.converter import cache_key, check_options
from utils.errors import EXIT_OK, EXIT_SOME_INPUTS_FAILED
from utils.labels import VOC_CLASSES, label_map_for
from utils.models import resolve_model
from utils.pipeline import DECODE_NAMES, default_workers, resolve_decode
from utils.voc import Detection, VocDataset, detections_to_voc, evaluate, mean_ap

EVAL_BACKENDS = [name for name in BACKENDS if name != "auto"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("backend", choices=EVAL_BACKENDS, help="the backend to evaluate")
    cli.add_model_args(parser)
    parser.add_argument("-p", "--precision", choices=("FP32", "FP16", "INT8"), default="FP32")
    parser.add_argument("-b", "--batch-size", type=int, default=64, help="inference batch size (default 64)")
    cli.add_voc_args(parser)
    parser.add_argument("--split", default="test", help="ImageSets/Main/<split>.txt (default test)")
    parser.add_argument("-j", "--workers", type=int, default=None,
                        help="decode/resize worker threads (default: one per core)")
    parser.add_argument("-f", "--force", action="store_true", help="run the detector even if cached results match")
    parser.add_argument("--compare", choices=EVAL_BACKENDS, help="also evaluate this backend and compare")
    parser.add_argument("--tolerance", type=float, default=0.5,
                        help="largest |mAP difference| in AP points that --compare accepts (default 0.5)")
    parser.add_argument("--plot", action="store_true", help="write a PR-curve PNG into the results folder")
    cli.add_flavour_arg(parser)
    cli.add_decode_arg(parser)
    cli.add_trt_module_arg(parser)
    cli.add_ray_args(parser)
    args = parser.parse_args(argv)
    cli.check_decode_arg(parser, args)
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--batch-size and --limit must be at least 1")
    if args.workers is None:
        args.workers = default_workers()
    return args


def evaluate_backend(name: str, args, model, dataset):
    """Detections of one backend (run or cached) -> (ClassAp list, RunStats, label map, results folder)."""
    folder = ev.results_dir(args.workspace, model.name, name, args.precision)
    flavour = None if name == "tensorflow" else args.flavour
    decode = "cpu" if name == "tensorflow" or args.ray else args.decode
    key = ev.run_key(dataset, cache_key(model, flavour or "portable", args.precision), name, args.precision, decode)
    cached = None if args.force else ev.load_cached(folder, dataset.split, key)
    if cached is None and args.ray:
        detections, stats, labels = detect_on_ray(name, args, model, dataset, flavour, key)
        detections = ev.save_detections(folder, dataset.split, key, detections, stats)
    elif cached is None:
        backend = create_backend(name, model, args.precision, args.batch_size, log=cli.log, flavour=flavour)
        labels = label_map_for(model.labels, backend.spec.num_classes)
        detections, stats = ev.run_detections(backend, dataset, labels, args.batch_size, args.workers,
                                              resolve_decode(decode, backend))
        detections = ev.save_detections(folder, dataset.split, key, detections, stats)
    else:
        cli.log(f"Using cached {name} detections from {folder} (-f to run again)")
        detections, stats = cached
        labels = label_map_for(model.labels, stats.num_classes)
    return evaluate(dataset, detections), stats, labels, folder


def detect_on_ray(name: str, args, model, dataset: VocDataset, flavour: str | None,
                  key: dict) -> tuple[dict[str, list[Detection]], ev.RunStats, dict[int, str]]:
    """run_detections on a Ray cluster (utils.distributed): detections by VOC class, stats, label map."""
    from utils import distributed  # noqa: PLC0415

    config = distributed.DetectorConfig(name, model, args.precision, args.batch_size, flavour=flavour)
    ids, paths = [image.image_id for image in dataset.images], [image.path for image in dataset.images]
    run_key = {"run": key, "inputs": distributed.input_key(ids, paths), "batch": args.batch_size}
    shards = distributed.run_folder(args.workspace, run_key)
    if args.force:
        shutil.rmtree(shards, ignore_errors=True)
    distributed.connect(cli.ray_address(args))
    started = time.perf_counter()
    run = distributed.run(ids, paths, config, shards, run_key, args.ray_workers, cli.log)
    labels = label_map_for(model.labels, run.num_classes)
    by_class: dict[str, list[Detection]] = {voc_name: [] for voc_name in VOC_CLASSES}
    for record in (record for record in run.records if record.error is None):
        for voc_name, found in detections_to_voc(np.array(record.rows, np.float32), *record.size, labels).items():
            by_class[voc_name].extend((record.key, *map(float, row)) for row in found)
    failed = [record.error for record in run.records if record.error]
    stats = ev.RunStats(images=len(run.records) - len(failed), failed=failed, seconds=time.perf_counter() - started,
                        inference_seconds=run.inference_seconds, num_classes=run.num_classes)
    return by_class, stats, labels


def print_report(name: str, args, model, dataset, results, stats, detectable) -> float:
    score = mean_ap(results, detectable)
    print(f"\nVOC2007 {dataset.split}: {stats.images} images, model {model.name}, backend {name} {args.precision}")
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
              f"(batch {args.batch_size}, {args.workers} read/decode workers)")
    print(f"Image decode: {DECODE_NAMES[stats.decode]}" + (f"; {stats.cpu_decoded} images decoded on the CPU "
                                                           f"instead (not JPEG, CMYK, ...)" if stats.cpu_decoded else ""))
    return score


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.apply_trt_module(args)
    with cli.user_errors():
        check_options(args.flavour or "portable", args.precision)
        if args.ray:
            from utils.distributed import import_ray  # noqa: PLC0415

            import_ray()
        dataset = cli.voc_dataset(args, args.split)
        model = resolve_model(args.model, args.workspace)
        backends = [args.backend] + ([args.compare] if args.compare and args.compare != args.backend else [])
        reports = {}
        for name in backends:
            results, stats, labels, folder = evaluate_backend(name, args, model, dataset)
            detectable = ev.detectable_classes(labels)
            ev.log_skipped(dataset, stats, cli.log)
            score = print_report(name, args, model, dataset, results, stats, detectable)
            if args.plot:
                path = ev.plot_pr_curves(results, detectable, f"{model.name} — {name} {args.precision}",
                                         folder / f"pr_curves_{dataset.split}.png")
                print(f"Saved PR curves to: {path}")
            reports[name] = (results, score, stats)
        failures = len(dataset.skipped) + len(reports[args.backend][2].failed)
        if failures:
            cli.log(f"{failures} of {failures + reports[args.backend][2].images} images skipped (see warnings)")
        if len(reports) == 2:
            (ours, our_map, _), (theirs, their_map, _) = reports[args.backend], reports[args.compare]
            delta = (our_map - their_map) * 100
            print(f"\n{args.backend} vs {args.compare}:")
            print("\n".join(ev.compare_lines(ours, theirs, args.backend, args.compare, detectable)))
            verdict = "within" if abs(delta) <= args.tolerance else "OUTSIDE"
            print(f"mAP {our_map:.4f} vs {their_map:.4f}: delta {delta:+.2f} points, {verdict} the tolerance "
                  f"of {args.tolerance} points")
            if abs(delta) > args.tolerance:
                return EXIT_SOME_INPUTS_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
