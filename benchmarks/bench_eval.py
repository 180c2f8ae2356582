#!/usr/bin/env python3
"""CPU speed and accuracy side by side, in ONE run: JPEG files -> VOC detections for our runtimes and the peers.

Contenders (--contenders, default all):

  tensorflow      the untouched frozen graph in TensorFlow, fed each decoded JPEG at its own size
                  (``image_tensor:0``, the graph resizes), as a TensorFlow user runs it
  tf2onnx         the WHOLE frozen graph converted by ``python -m tf2onnx.convert --graphdef ... --inputs
                  image_tensor:0 --outputs detection_boxes:0,...`` (cached beside the model) in ONNX Runtime:
                  the peer a user gets for free
  ort-fp32, ort-int8                 ours on onnxruntime (INT8: the onnxruntime-qoperator form)
  ov-fp32, ov-bf16, ov-int8          ours on openvino (INT8: the openvino-nncf form)

Ours go through voc_evaluation.py's path (utils.plan -> utils.run executor: decode + resize in worker threads
overlapping inference -> runner.detect). The peers decode in the same number of worker threads, ahead of
inference. INT8 is calibrated on --calib-dir (default: $SSD_SHARED_DIR/images, else images/): never on the
evaluated images. Every contender is opened and warmed up first; then --passes interleaved passes over the
same images (pass 1: A B C ..., pass 2: A B C ...); the median pass is reported: end-to-end img/s, inference-only
img/s, the process's core occupancy, and the person AP (VOC07 11-point, from pass 1). JSON to --out.

  python -m benchmarks.bench_eval -m ssdlite_mobilenet_v2_pedestrian -d ../shared/data/VOCdevkit/VOC2007 \\
      --out workspace/bench_eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path

import numpy as np

from benchmarks.common import comma_choices, write_json
from utils import cli
from utils.artifact import file_fingerprint
from utils.errors import UserError
from utils.files import atomic_path, write_text_atomic
from utils.pipeline import default_workers

OURS = {"ort-fp32": ("onnxruntime", "FP32"), "ort-int8": ("onnxruntime", "INT8"),
        "ov-fp32": ("openvino", "FP32"), "ov-bf16": ("openvino", "BF16"), "ov-int8": ("openvino", "INT8")}
PEERS = ("tensorflow", "tf2onnx")
CONTENDERS = (*PEERS, *OURS)
TF_OUTPUTS = ("detection_boxes", "detection_scores", "detection_classes", "num_detections")


@dataclass
class Pass:
    seconds: float
    inference_seconds: float
    cpu_seconds: float
    images: int
    detections: dict = field(default_factory=dict, repr=False)


# --- the peers: the whole frozen graph, fed decoded images at their own size ------------------------------------

def whole_graph_onnx(graph: Path) -> Path:
    """tf2onnx's conversion of the whole frozen graph, cached beside it (keyed by the graph and tf2onnx)."""
    from importlib.metadata import version  # noqa: PLC0415

    path = graph.with_name(f"{graph.parent.name}_tf2onnx_whole_graph.onnx")
    key_path = path.with_suffix(".convert.json")
    key = {"graph": file_fingerprint(graph), "tf2onnx": version("tf2onnx")}
    try:
        record = json.loads(key_path.read_text(encoding="utf-8"))
        if record["key"] == key and record["file"] == file_fingerprint(path):
            return path
    except (OSError, ValueError, KeyError, TypeError):
        pass
    print(f"Converting the whole graph {graph} with tf2onnx (once)...", file=sys.stderr, flush=True)
    with atomic_path(path) as tmp:
        done = subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--graphdef", str(graph), "--output", str(tmp),
                               "--inputs", "image_tensor:0", "--outputs", ",".join(f"{n}:0" for n in TF_OUTPUTS)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(f"tf2onnx could not convert {graph}: {done.stderr.strip().splitlines()[-1:]}")
    write_text_atomic(key_path, json.dumps({"key": key, "file": file_fingerprint(path)}, indent=1))
    return path


class WholeGraphPeer:
    """The frozen graph as users run it: one decoded image (uint8 [1, H, W, 3]) per run, TF OD API outputs."""

    def __init__(self, name: str, graph: Path, labels: dict[int, str], workers: int):
        self.name, self.labels, self.workers = name, labels, workers
        if name == "tensorflow":
            from utils import tf_graph  # noqa: PLC0415

            session = tf_graph.open_session(tf_graph.load_graph_def(graph))
            fetches = [f"{n}:0" for n in TF_OUTPUTS]
            self.run = lambda pixels: session.run(fetches, {"image_tensor:0": pixels})
        else:
            import onnxruntime as ort  # noqa: PLC0415

            options = ort.SessionOptions()
            options.log_severity_level = 3
            session = ort.InferenceSession(str(whole_graph_onnx(graph)), options, providers=["CPUExecutionProvider"])
            self.run = lambda pixels: session.run([f"{n}:0" for n in TF_OUTPUTS], {"image_tensor:0": pixels})

    @staticmethod
    def decode(path: Path) -> np.ndarray:
        from utils.preprocess import read_image  # noqa: PLC0415

        return np.asarray(read_image(path).image)[None]

    def detect_all(self, dataset) -> Pass:
        from utils.labels import VOC_CLASSES  # noqa: PLC0415
        from utils.voc import detections_to_voc  # noqa: PLC0415

        by_class = {name: [] for name in VOC_CLASSES}
        images, window, inference = dataset.images, 2 * self.workers, 0.0
        started, cpu = time.perf_counter(), time.process_time()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="decode") as pool:
            pending = [pool.submit(self.decode, image.path) for image in images[:window]]
            for index, image in enumerate(images):
                pixels = pending[index].result()
                pending[index] = None
                if index + window < len(images):
                    pending.append(pool.submit(self.decode, images[index + window].path))
                begin = time.perf_counter()
                boxes, scores, classes, count = self.run(pixels)
                inference += time.perf_counter() - begin
                valid = int(count[0])
                rows = np.zeros((valid, 7), np.float64)
                rows[:, 1], rows[:, 2] = classes[0, :valid], scores[0, :valid]
                rows[:, 3:] = boxes[0, :valid][:, [1, 0, 3, 2]]
                height, width = pixels.shape[1:3]
                for name, found in detections_to_voc(rows, width, height, self.labels).items():
                    by_class[name].extend((image.image_id, *map(float, row)) for row in found)
        return Pass(time.perf_counter() - started, inference, time.process_time() - cpu, len(images), by_class)

    def close(self) -> None:
        pass


class Ours:
    """One of our plans, through voc_evaluation.py's executor."""

    def __init__(self, name: str, args: argparse.Namespace):
        from utils.plan import Plan  # noqa: PLC0415
        from utils.run import open_executor  # noqa: PLC0415

        backend, precision = OURS[name]
        self.name = name
        self.plan = Plan.resolve(model=args.model, workspace=args.workspace, backend=backend, precision=precision,
                                 flavour=args.flavour, batch_size=args.batch_size, decode="cpu",
                                 calib_dir=args.calib_dir)
        self.artifact = self.plan.prepare()
        self.labels = self.artifact.labels
        self.context = open_executor(self.plan, self.artifact, workers=args.workers)
        self.executor = self.context.__enter__()

    def detect_all(self, dataset) -> Pass:
        from utils.evaluation import run_detections  # noqa: PLC0415

        cpu = time.process_time()
        by_class, stats = run_detections(self.executor, dataset, self.labels, "cpu", self.name)
        return Pass(stats.seconds, stats.inference_seconds, time.process_time() - cpu, stats.images, by_class)

    def describe(self) -> dict:
        return {"backend": self.plan.backend, "precision": self.plan.precision, "flavour": self.artifact.flavour,
                "file": self.artifact.path.name, "quantization": self.artifact.quantization,
                "settings": self.executor.settings()}

    def close(self) -> None:
        self.context.__exit__(None, None, None)


# --- the run --------------------------------------------------------------------------------------------------

def default_calib_dir() -> Path | None:
    shared = os.environ.get("SSD_SHARED_DIR")
    return Path(shared) / "images" if shared and (Path(shared) / "images").is_dir() else None


def decode_ms(dataset, count: int = 60) -> dict:
    """One thread's decode and preprocess time per image (the input side's cost)."""
    from utils.preprocess import preprocess, read_image  # noqa: PLC0415

    paths = [image.path for image in dataset.images[:count]]
    start = time.perf_counter()
    decoded = [read_image(path, (300, 300)).image for path in paths]
    middle = time.perf_counter()
    for image in decoded:
        preprocess(image)
    end = time.perf_counter()
    return {"decode_ms_per_image": 1e3 * (middle - start) / len(paths),
            "resize_normalise_ms_per_image": 1e3 * (end - middle) / len(paths)}


def person_ap(dataset, detections: dict) -> float | None:
    from utils.voc import evaluate  # noqa: PLC0415

    (result,) = evaluate(dataset, detections, ["person"])
    return result.ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", default="ssdlite_mobilenet_v2_pedestrian",
                        help="a registry name, a model folder or a .pb (default: %(default)s)")
    parser.add_argument("-w", "--workspace", type=Path, default=cli.DEFAULT_WORKSPACE)
    cli.add_voc_args(parser, limit=300)
    parser.add_argument("--contenders", type=comma_choices(CONTENDERS), default=list(CONTENDERS),
                        help=f"comma-separated (default: all: {','.join(CONTENDERS)})")
    parser.add_argument("--flavour", choices=("core", "portable"), default="portable",
                        help="the flavour of ours (default: %(default)s: NMS inside the graph; core's NMS after the "
                             "network is utils.postprocess's array-API one, 5-14 ms/image on these CPUs)")
    parser.add_argument("-b", "--batch-size", type=int, default=8, help="batch of ours (default: %(default)s)")
    parser.add_argument("-j", "--workers", type=int, default=default_workers(),
                        help="decode worker threads, ours and the peers' (default: one per core)")
    parser.add_argument("--passes", type=int, default=3, help="interleaved passes; the median is reported")
    parser.add_argument("--calib-dir", type=Path, default=default_calib_dir(),
                        help="INT8 calibration images, not evaluated ones (default: $SSD_SHARED_DIR/images, else "
                             "images/)")
    parser.add_argument("--out", "--json", dest="out", type=Path, default=Path("bench_eval.json"))
    args = parser.parse_args(argv)
    if args.passes < 1 or args.batch_size < 1 or args.workers < 1:
        parser.error("--passes, -b and -j must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging()
    with cli.user_errors():
        from utils.models import resolve_model  # noqa: PLC0415

        dataset = cli.voc_dataset(args)
        model = resolve_model(args.model, args.workspace)
        contenders = {}
        for name in [n for n in args.contenders if n in OURS] + [n for n in args.contenders if n in PEERS]:
            print(f"opening {name}...", file=sys.stderr, flush=True)
            labels = next(iter(contenders.values())).labels if contenders else None
            if name in PEERS and labels is None:
                from utils.labels import model_labels  # noqa: PLC0415

                labels = model_labels(None, model.graph_path, model.config_path, model.labels)
            contenders[name] = Ours(name, args) if name in OURS else WholeGraphPeer(name, model.graph_path, labels,
                                                                                      args.workers)
        order = [name for name in CONTENDERS if name in contenders]
        try:
            warm = replace(dataset, images=dataset.images[:16])
            for name in order:
                contenders[name].detect_all(warm)
            passes = {name: [] for name in order}
            for number in range(args.passes):
                for name in order:
                    passes[name].append(contenders[name].detect_all(dataset))
                    print(f"pass {number + 1} {name}: {passes[name][-1].images / passes[name][-1].seconds:.1f} img/s",
                          file=sys.stderr, flush=True)
            described = {name: c.describe() for name, c in contenders.items() if isinstance(c, Ours)}
        finally:
            for contender in contenders.values():
                contender.close()
        rows = []
        for name in order:
            median = sorted(passes[name], key=lambda p: p.seconds)[len(passes[name]) // 2]
            rows.append({"contender": name, "images": median.images,
                         "end_to_end_img_per_s": median.images / median.seconds,
                         "inference_img_per_s": median.images / median.inference_seconds,
                         "end_to_end_img_per_s_passes": [p.images / p.seconds for p in passes[name]],
                         "core_occupancy": median.cpu_seconds / (median.seconds * (os.cpu_count() or 1)),
                         "person_ap": person_ap(dataset, passes[name][0].detections),
                         **described.get(name, {})})
    peers = [row["end_to_end_img_per_s"] for row in rows if row["contender"] in PEERS]
    best_peer = max(peers) if peers else None
    print(f"\n{model.name}: {rows[0]['images']} VOC images, batch {args.batch_size} (ours), {args.workers} decode "
          f"workers, median of {args.passes} interleaved passes, {os.cpu_count()} cores")
    print(f"{'contender':<12}{'e2e img/s':>11}{'infer img/s':>13}{'cores busy':>12}{'person AP':>11}"
          f"{'vs best peer':>14}")
    for row in rows:
        row["vs_best_peer"] = row["end_to_end_img_per_s"] / best_peer if best_peer else None
        ap = row["person_ap"]
        print(f"{row['contender']:<12}{row['end_to_end_img_per_s']:>11.1f}{row['inference_img_per_s']:>13.1f}"
              f"{100 * row['core_occupancy']:>11.0f}%{ap if ap is not None else float('nan'):>11.4f}"
              + (f"{row['vs_best_peer']:>13.2f}x" if best_peer else ""))
    report = {"model": model.name, "date": date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.system()}",
              "images": rows[0]["images"], "batch_size": args.batch_size, "workers": args.workers,
              "passes": args.passes, "calibration": str(args.calib_dir) if args.calib_dir else "images/",
              "input_side": decode_ms(dataset), "results": rows}
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
