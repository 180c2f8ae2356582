#!/usr/bin/env python3
"""Files on disk -> detections, side by side with the engine alone, for each input path.

For every batch size: the engine alone (input already on the device, benchmarks.common.measure),
then JPEG files -> decoded + resized batches -> engine -> NMS -> host detections through
utils.run.detect_batches (the one detection loop) with decode cpu on one worker thread, cpu on every
core, gpu (nvJPEG: hardware engines via nvImageCodec), gpu-cuda (torchvision's nvJPEG on CUDA) and dali
(the NVIDIA DALI pipeline of utils.dali_input, what --decode gpu uses when DALI is installed). The "outside" column is the share of end-to-end time not spent in the engine
alone. Each row also has the stages one at a time, in ms per batch ("stages": launch, NMS alone on the
engine's real outputs, finish = NMS + copy back) and, per path, where the loop's time went (input wait, launch,
wait for finish: on CUDA finish of batch k runs on a worker thread during the engine on batch k + 1), and how many
images the hardware JPEG engines decoded (null for dali: DALI does not report it). Optionally (--voc) the VOC AP of the cpu, gpu and dali decode paths on the same model, through
utils.evaluation.run_detections (label map from the file). Runs from a converted ONNX file (--onnx;
it carries its own description, no TensorFlow), so it runs on the GPU machine; -m MODEL converts
first. Writes JSON. Run from the repository root:

  python -m benchmarks.bench_e2e --onnx workspace/models/<model>/<model>_core_FP16.onnx --images DIR \\
      --batches 1,64,256 --repeat 10 --json $OUT/e2e.json
  python -m benchmarks.bench_e2e --onnx workspace/models/<pedestrian>_core_FP32.onnx --voc VOC2007
  python -m benchmarks.bench_e2e --onnx pedestrian_core.onnx --images images --batches 1,2 --paths cpu1,cpu
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

from benchmarks.common import (add_runtime_args, comma_choices, gpu_name, measure, parse_batches, resolve_plan,
                               write_json)
from utils import cli
from utils.pipeline import count_total
from utils.run import detect_batches, open_executor

PATHS = ("cpu1", "cpu", "gpu", "gpu-cuda", "dali")


def decode_of(path: str) -> str:
    """The --decode value of a row: cpu1 / cpu -> cpu, gpu / gpu-cuda / dali -> gpu."""
    return "cpu" if path.startswith("cpu") else "gpu"


def default_paths() -> list[str]:
    """Every row, dali only where DALI is installed."""
    from utils.dali_input import dali_installed  # noqa: PLC0415

    return [path for path in PATHS if path != "dali" or dali_installed()]


def end_to_end(runner, paths: list[Path], batch: int, workers: int, decode: str) -> dict:
    """Images/s from files to host detections through utils.run.detect_batches: a warm-up batch first, then
    timed from the moment the first batch arrives (its wait, which includes starting the decode processes,
    is reported apart)."""
    for _ in detect_batches(runner, paths[:batch], batch, decode, workers):
        pass
    count, on_cpu, hardware, startup = 0, 0, 0, None
    stages = dict.fromkeys(("detect_s", "input_wait_s", "launch_s", "finish_s", "finish_wait_s"), 0.0)
    began = time.perf_counter()
    for result in detect_batches(runner, paths, batch, decode, workers):
        if startup is None:                  # steady state: timed from the first batch's arrival
            startup = result.input_seconds
        else:
            stages["input_wait_s"] += result.input_seconds
        stages["detect_s"] += result.inference_seconds
        stages["launch_s"] += result.launch_seconds
        stages["finish_s"] += result.inference_seconds - result.launch_seconds
        stages["finish_wait_s"] += result.finish_wait_seconds
        count += len(result.results)
        on_cpu, hardware = on_cpu + result.cpu_decoded, count_total(hardware, result.hardware_decoded)
    seconds = time.perf_counter() - began - startup
    # the stages as this thread sees them (utils.run.BatchResult): waiting for the next input batch (what the
    # input path did not hide), launch (input copy, engine, copy of its outputs), waiting for finish (NMS and
    # copies back, on a worker thread when the runner overlaps them with the next launch: max_in_flight > 1);
    # detect_s = launch + finish, which overlap when in_flight > 1
    return {"images": count, "seconds": seconds, "img_per_s": count / seconds, "cpu_decoded": on_cpu,
            "hardware_decoded": hardware, "first_batch_s": startup, **stages, "in_flight": runner.max_in_flight}


def stage_times(runner, images: list[Path], batch: int, workers: int, repeat: int = 10) -> dict:
    """Milliseconds per batch, synchronised, on one batch of real inputs (decoded on the CPU, then on the
    runner's device): launch (input copy, engine, copy of its outputs), finish (NMS, copy back), the two in
    turn, and NMS alone (utils.postprocess.batched_multiclass_nms on the engine's real outputs; core flavour
    only, None where NMS is inside the graph). Medians of ``repeat`` after two warm-ups."""
    from utils.artifact import flavour_info  # noqa: PLC0415
    from utils.pipeline import input_batches  # noqa: PLC0415
    from utils.postprocess import batched_multiclass_nms  # noqa: PLC0415

    tensor = next(iter(input_batches(images[:batch], batch, runner.spec.input_size, workers, "cpu"))).tensor
    synchronize = lambda: None  # noqa: E731
    if runner.takes_device_input:
        import torch  # noqa: PLC0415

        tensor, synchronize = torch.from_numpy(tensor).cuda(), torch.cuda.synchronize

    def timed(step) -> tuple:
        synchronize()
        started = time.perf_counter()
        value = step()
        synchronize()
        return time.perf_counter() - started, value

    launch, finish, nms = [], [], []
    for _ in range(repeat + 2):
        seconds, handle = timed(lambda: runner.launch(tensor))
        launch.append(seconds)
        finish.append(timed(lambda: runner.finish(handle))[0])
    outputs = (runner.run_network_on_device(tensor) if runner.takes_device_input else runner.run_network(tensor))
    outputs = [value.clone() if runner.takes_device_input else np.array(value) for value in outputs]
    if not flavour_info(runner.artifact.flavour).nms_inside:
        nms = [timed(lambda: batched_multiclass_nms(*outputs, runner.spec.nms))[0] for _ in range(repeat + 2)]

    def ms(times: list[float]):
        return statistics.median(times[2:]) * 1000 if times else None

    return {"batch": len(tensor), "launch_ms": ms(launch), "finish_ms": ms(finish),
            "detect_ms": ms([a + b for a, b in zip(launch, finish)]), "nms_ms": ms(nms)}


@contextlib.contextmanager
def gpu_decoder(path: str):
    """The GPU input path of a row (utils.gpu_input.gpu_decoder): "dali" DALI's pipeline, "gpu" nvJPEG with
    the hardware engines (nvImageCodec), "gpu-cuda" torchvision's nvJPEG on CUDA only."""
    settings = {"dali": {"SSD_GPU_DECODER": "dali"}, "gpu": {"SSD_GPU_DECODER": "nvjpeg"},
                "gpu-cuda": {"SSD_GPU_DECODER": "nvjpeg", "SSD_NVJPEG_HARDWARE": "0"}}.get(path, {})
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def voc_ap(args: argparse.Namespace, artifact, paths: list[str], batch: int, workers: int) -> dict:
    """VOC AP of the model for each decode path among cpu, gpu, gpu-cuda, dali (same file, same images), through
    utils.evaluation.run_detections on a local executor (utils.run.open_executor)."""
    from utils import evaluation as ev  # noqa: PLC0415
    from utils.voc import evaluate, load_dataset, mean_ap  # noqa: PLC0415

    dataset = load_dataset(args.voc, "test", args.limit)
    detectable = ev.detectable_classes(artifact.labels)
    report = {}
    for path in paths:
        plan = resolve_plan(args, "onnxruntime", batch, decode_of(path))
        with gpu_decoder(path), open_executor(plan, artifact, workers=workers) as executor:
            detections, stats = ev.run_detections(executor, dataset, artifact.labels, plan.decode,
                                                  f"VOC decode {path}")
        results = evaluate(dataset, detections)
        report[path] = {"mAP": mean_ap(results, detectable), "images": stats.images, "cpu_decoded": stats.cpu_decoded,
                        "ap": {r.name: r.ap for r in results if r.name in detectable}}
    if "cpu" in report and "gpu" in report:
        report["delta_points"] = (report["gpu"]["mAP"] - report["cpu"]["mAP"]) * 100
    if "cpu" in report and "gpu-cuda" in report:
        report["delta_points_gpu_cuda"] = (report["gpu-cuda"]["mAP"] - report["cpu"]["mAP"]) * 100
    if "cpu" in report and "dali" in report:
        report["delta_points_dali"] = (report["dali"]["mAP"] - report["cpu"]["mAP"]) * 100
    return report


def voc_line(voc: dict) -> str:
    line = "VOC mAP " + ", ".join(f"decode {path} {voc[path]['mAP']:.4f}"
                                  for path in ("cpu", "gpu", "gpu-cuda", "dali") if path in voc)
    if "delta_points" in voc:
        line += (f"; gpu - cpu {voc['delta_points']:+.2f} points ({voc['gpu']['cpu_decoded']} images decoded on the "
                 f"CPU by the gpu path)")
    if "delta_points_gpu_cuda" in voc:
        line += f"; gpu-cuda (torchvision) - cpu {voc['delta_points_gpu_cuda']:+.2f} points"
    if "delta_points_dali" in voc:
        line += (f"; dali - cpu {voc['delta_points_dali']:+.2f} points ({voc['dali']['cpu_decoded']} images decoded "
                 f"on the CPU by the dali path)")
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_source_args(parser)
    add_runtime_args(parser)
    parser.add_argument("--images", type=Path, help="folder of JPEGs for the speed table")
    parser.add_argument("--batches", type=parse_batches, default=parse_batches("1,64,256"),
                        help="batch sizes (default 1,64,256)")
    parser.add_argument("--repeat", type=int, default=5, help="passes over the images in the gpu rows (batch > 1)")
    parser.add_argument("--paths", type=comma_choices(PATHS), default=None,
                        help="rows: cpu1 (one decode thread), cpu (all cores), gpu (hardware nvJPEG if installed), "
                             "gpu-cuda (torchvision's nvJPEG on CUDA), dali (NVIDIA DALI) (default: all, dali where "
                             "installed)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds of the engine-only figure")
    parser.add_argument("--voc", type=Path, metavar="VOC2007",
                        help="also the VOC AP of the decode paths in --paths (cpu1 counts as cpu) on this VOC2007 "
                             "folder, batch 64, every core")
    parser.add_argument("--limit", type=int, default=None, help="with --voc: the first N image ids only")
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="sys.setswitchinterval for the run (the GIL hand-over period; Python's default 0.005 s)")
    parser.add_argument("--json", type=Path, default=Path("bench_e2e.json"))
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    args.paths = args.paths or default_paths()
    cli.setup_logging()

    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    cores = os.cpu_count() or 1
    voc_paths = list(dict.fromkeys("cpu" if path == "cpu1" else path for path in args.paths))
    rows = []
    with cli.user_errors():
        # every plan resolved first: a decode path that cannot run here fails before anything is measured
        batches = args.batches if args.images else []
        plans = {(batch, decode): resolve_plan(args, "onnxruntime", batch, decode)
                 for batch in batches for decode in ["cpu", *dict.fromkeys(map(decode_of, args.paths))]}
        if args.voc:
            for path in voc_paths:
                resolve_plan(args, "onnxruntime", 64, decode_of(path))
        artifact = resolve_plan(args, "onnxruntime", 1).prepare()   # ONNX Runtime runs one file at every batch
        if args.images:
            images = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
            stage_decode = "gpu" if "gpu" in map(decode_of, args.paths) else "cpu"
            for batch in batches:
                # one runner per row: a CUDA graph is bound to its buffers
                with plans[batch, "cpu"].open(artifact) as runner:
                    engine = batch / statistics.median(measure(runner, batch, args.seconds, 10))
                    row = {"batch": batch, "device": runner.device, "engine_img_per_s": engine}
                # per batch, each stage alone (a runner of its own: a CUDA graph is bound to one input's buffers)
                with plans[batch, stage_decode].open(artifact) as runner:
                    row["stages"] = {"engine_ms": batch / engine * 1000,
                                     **stage_times(runner, images, batch, cores)}
                for path in args.paths:
                    decode = decode_of(path)
                    workers = 1 if path == "cpu1" else cores
                    passes = args.repeat if decode == "gpu" and batch > 1 else 1
                    with gpu_decoder(path), plans[batch, decode].open(artifact) as runner:
                        result = end_to_end(runner, images * passes, batch, workers, decode)
                    row[path] = {**result, "workers": workers, "outside_engine": 1 - result["img_per_s"] / engine}
                rows.append(row)
                print(json.dumps(row), flush=True)
        machine = f"{gpu_name()}, {os.cpu_count()} CPU cores"
        print(f"\n{artifact.path.name}: {artifact.flavour} {artifact.precision}, nhwc={args.nhwc}, "
              f"cuda_graph={args.cuda_graph}; {machine}; {date.today()}")
        print(f"{'batch':>6}{'engine img/s':>14}" + "".join(f"{p + ' img/s':>13}{'outside':>9}" for p in args.paths))
        for row in rows:
            print(f"{row['batch']:>6}{row['engine_img_per_s']:>14.0f}" + "".join(
                f"{row[p]['img_per_s']:>13.0f}{row[p]['outside_engine'] * 100:>8.0f}%" for p in args.paths))
        for row in rows:
            stages = row["stages"]
            nms = f"{stages['nms_ms']:.1f}" if stages["nms_ms"] is not None else "inside the graph"
            print(f"batch {row['batch']} ({row['device']}), ms per batch: engine alone {stages['engine_ms']:.1f}, "
                  f"launch {stages['launch_ms']:.1f}, NMS alone {nms}, finish (NMS + copy back) "
                  f"{stages['finish_ms']:.1f}, launch + finish {stages['detect_ms']:.1f}")
        report = {"onnx": artifact.path.name, "flavour": artifact.flavour, "precision": artifact.precision,
                  "nhwc": args.nhwc, "cuda_graph": args.cuda_graph, "switch_interval": sys.getswitchinterval(),
                  "machine": machine, "date": date.today().isoformat(), "rows": rows}
        if args.voc:
            report["voc"] = voc_ap(args, artifact, voc_paths, 64, cores)
            print(voc_line(report["voc"]))
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
