#!/usr/bin/env python3
"""Files on disk -> detections, side by side with the engine alone, for each input path.

For every batch size: the engine alone (input already on the device, bench_engine's measure), then
JPEG files -> decoded + resized batches -> engine -> NMS -> host detections through
utils.pipeline.input_batches with decode cpu on one worker thread, cpu on every core, and gpu
(nvJPEG). The "outside" column is the share of end-to-end time not spent in the engine alone.
Optionally (--voc) the VOC AP of the cpu and gpu decode paths on the same model. Works from an ONNX
file and its sidecar JSON (no TensorFlow), so it runs on the GPU machine. Writes JSON.

  python benchmarks/bench_e2e.py workspace/models/<model>/<model>_core_FP16.onnx --images DIR \\
      --batches 1,64,256 --repeat 10 --json $OUT/e2e.json
  python benchmarks/bench_e2e.py workspace/models/<pedestrian>_core_FP32.onnx --voc VOC2007 --labels person
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import gpu_name, measure  # noqa: E402

from utils.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from utils.converter import spec_from_dict  # noqa: E402
from utils.files import write_text_atomic  # noqa: E402
from utils.pipeline import input_batches, resolve_decode  # noqa: E402


def end_to_end(backend: OnnxRuntimeBackend, paths: list[Path], batch: int, workers: int, decode: str) -> dict:
    """Images/s from files to host detections: a warm-up batch first, then timed from the moment the
    first batch arrives (its wait, which includes starting the decode processes, is reported apart)."""
    for warm in input_batches(paths[:batch], batch, backend.spec.input_size, workers, decode):
        backend.detect(warm.tensor)
    count, on_cpu, hardware, began = 0, 0, 0, time.perf_counter()
    started = None
    for loaded in input_batches(paths, batch, backend.spec.input_size, workers, decode):
        if started is None:                  # steady state: timed from the first batch's arrival
            startup, started = time.perf_counter() - began, time.perf_counter()
        count += len(loaded.items)
        backend.detect(loaded.tensor)
        on_cpu, hardware = on_cpu + loaded.cpu_decoded, hardware + loaded.hardware_decoded
    seconds = time.perf_counter() - started
    return {"images": count, "seconds": seconds, "img_per_s": count / seconds, "cpu_decoded": on_cpu,
            "hardware_decoded": hardware, "first_batch_s": startup}


@contextlib.contextmanager
def gpu_decoder(path: str):
    """Row "gpu-cuda": torchvision's nvJPEG on CUDA only (SSD_NVJPEG_HARDWARE=0); "gpu": the default."""
    saved = os.environ.get("SSD_NVJPEG_HARDWARE")
    if path == "gpu-cuda":
        os.environ["SSD_NVJPEG_HARDWARE"] = "0"
    try:
        yield
    finally:
        os.environ.pop("SSD_NVJPEG_HARDWARE", None)
        if saved is not None:
            os.environ["SSD_NVJPEG_HARDWARE"] = saved


def voc_ap(onnx: Path, spec, precision: str, flavour: str, voc: Path, labels: str | None, batch: int,
           workers: int) -> dict:
    """VOC AP of the model with decode cpu and decode gpu (same engine, same images)."""
    from utils import evaluation as ev  # noqa: PLC0415
    from utils.labels import label_map_for  # noqa: PLC0415
    from utils.voc import evaluate, load_dataset, mean_ap  # noqa: PLC0415

    dataset = load_dataset(voc, "test", None)
    label_map = label_map_for(labels, spec.num_classes)
    detectable = ev.detectable_classes(label_map)
    report = {}
    for path in ("cpu", "gpu", "gpu-cuda"):
        backend = OnnxRuntimeBackend.from_onnx(str(onnx), spec, precision, batch, flavour)
        with gpu_decoder(path):
            detections, stats = ev.run_detections(backend, dataset, label_map, batch, workers,
                                                  resolve_decode(path.split("-")[0], backend))
        results = evaluate(dataset, detections)
        report[path] = {"mAP": mean_ap(results, detectable), "images": stats.images,
                          "cpu_decoded": stats.cpu_decoded,
                          "ap": {r.name: r.ap for r in results if r.name in detectable}}
    report["delta_points"] = (report["gpu"]["mAP"] - report["cpu"]["mAP"]) * 100
    report["delta_points_gpu_cuda"] = (report["gpu-cuda"]["mAP"] - report["cpu"]["mAP"]) * 100
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("onnx", type=Path, help="a converted graph with its sidecar .json beside it")
    parser.add_argument("--images", type=Path, help="folder of JPEGs for the speed table")
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--repeat", type=int, default=5, help="passes over the images in the gpu rows (batch > 1)")
    parser.add_argument("--paths", default="cpu1,cpu,gpu,gpu-cuda",
                        help="rows: cpu1 (one decode thread), cpu (all cores), gpu (hardware nvJPEG if installed), "
                             "gpu-cuda (torchvision's nvJPEG on CUDA)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds of the engine-only figure")
    parser.add_argument("--nhwc", action="store_true", help="CUDA provider prefer_nhwc")
    parser.add_argument("--cuda-graph", action="store_true", help="ONNX Runtime CUDA graphs (CUDA only)")
    parser.add_argument("--voc", type=Path, help="also the VOC AP with decode cpu vs gpu on this VOC2007 folder")
    parser.add_argument("--labels", choices=("coco", "person"), default=None, help="label set for --voc")
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="sys.setswitchinterval for the run (the GIL hand-over period; Python's default 0.005 s)")
    parser.add_argument("--json", type=Path, default=Path("bench_e2e.json"))
    args = parser.parse_args()

    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    sidecar = json.loads(args.onnx.with_suffix(".json").read_text(encoding="utf-8"))
    spec, key = spec_from_dict(sidecar["spec"]), sidecar["key"]
    cores = os.cpu_count() or 1
    rows = []
    if args.images:
        images = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        for batch in (int(b) for b in args.batches.split(",")):
            def session() -> OnnxRuntimeBackend:       # one per row: a CUDA graph is bound to its buffers
                return OnnxRuntimeBackend.from_onnx(str(args.onnx), spec, key["precision"], batch, key["flavour"],
                                                    cuda_graph=args.cuda_graph, prefer_nhwc=args.nhwc)

            backend = session()
            engine = batch / statistics.median(measure(backend, batch, args.seconds, 10))
            row = {"batch": batch, "device": backend.device, "engine_img_per_s": engine}
            for path in args.paths.split(","):
                backend = session()
                decode, workers = ("cpu", 1) if path == "cpu1" else (path.split("-")[0], cores)
                passes = args.repeat if decode == "gpu" and batch > 1 else 1
                with gpu_decoder(path):
                    result = end_to_end(backend, images * passes, batch, workers, resolve_decode(decode, backend))
                row[path] = {**result, "workers": workers, "outside_engine": 1 - result["img_per_s"] / engine}
            rows.append(row)
            print(json.dumps(row), flush=True)
    machine = f"{gpu_name()}, {os.cpu_count()} CPU cores"
    print(f"\n{args.onnx.name}: {key['flavour']} {key['precision']}, nhwc={args.nhwc}, cuda_graph={args.cuda_graph}; "
          f"{machine}; {date.today()}")
    paths = args.paths.split(",")
    print(f"{'batch':>6}{'engine img/s':>14}" + "".join(f"{p + ' img/s':>13}{'outside':>9}" for p in paths))
    for row in rows:
        print(f"{row['batch']:>6}{row['engine_img_per_s']:>14.0f}" + "".join(
            f"{row[p]['img_per_s']:>13.0f}{row[p]['outside_engine'] * 100:>8.0f}%" for p in paths))
    report = {"onnx": args.onnx.name, "flavour": key["flavour"], "precision": key["precision"], "nhwc": args.nhwc,
              "cuda_graph": args.cuda_graph, "switch_interval": sys.getswitchinterval(),
              "machine": machine, "date": date.today().isoformat(), "rows": rows}
    if args.voc:
        report["voc"] = voc_ap(args.onnx, spec, key["precision"], key["flavour"], args.voc, args.labels, 64, cores)
        print(f"VOC mAP decode cpu {report['voc']['cpu']['mAP']:.4f}, gpu {report['voc']['gpu']['mAP']:.4f}: "
              f"delta {report['voc']['delta_points']:+.2f} points ({report['voc']['gpu']['cpu_decoded']} images "
              f"decoded on the CPU by the gpu path); gpu-cuda (torchvision) {report['voc']['gpu-cuda']['mAP']:.4f}, "
              f"delta {report['voc']['delta_points_gpu_cuda']:+.2f}")
    write_text_atomic(args.json, json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
