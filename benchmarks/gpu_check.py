#!/usr/bin/env python3
"""The GPU machine's one-call check of the DALI input path (issue 18); writes JSON and logs into --out.

  (a) pixels: DALI's GPU pipeline (utils.dali_input.build_pipeline("gpu")) on VOC JPEGs against the CPU path
      (utils.preprocess): its resize of the picture it decoded vs utils.preprocess on that same picture (the
      1e-3 resize check), its decode vs Pillow's, its whole output vs the CPU path's, and its resize of the
      CPU-decoded picture (fed losslessly as PNG) vs the CPU path, which separates decode from resize;
  (b) accuracy: benchmarks.bench_e2e --voc --paths cpu,dali on the pedestrian model (person AP, both decode
      paths, same images), then voc_evaluation.py --onnx FILE --decode gpu as users run it;
  (c) speed: benchmarks.bench_e2e on the InceptionV2 stand-in (core FP16) with --cuda-graph --nhwc, the VOC
      JPEGs x --repeat, batches 128 and 256, rows cpu / gpu-cuda (torchvision) / gpu (nvImageCodec) / dali
      beside the engine alone;
  (d) detect_objects.py --onnx FILE --decode gpu on one image.

Run from the repository root (about 5-8 minutes on the H200 machine):

  python -m benchmarks.gpu_check --pedestrian-onnx P_core_FP32.onnx --inception-onnx I_core_FP16.onnx \\
      --voc ../shared/data/VOCdevkit/VOC2007 --image ../shared/images/person.jpg --out $OUT

Without DALI it prints one line and exits 1.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from utils.dali_input import dali_installed
from utils.files import write_text_atomic


def pixel_check(voc: Path, count: int, device: str = "gpu") -> dict:
    """(a): the DALI GPU pipeline against utils.preprocess on ``count`` VOC JPEGs."""
    from PIL import Image  # noqa: PLC0415

    from utils.dali_input import build_pipeline  # noqa: PLC0415
    from utils.pipeline import load_one  # noqa: PLC0415
    from utils.preprocess import load_image, preprocess  # noqa: PLC0415

    paths = sorted((voc / "JPEGImages").glob("*.jpg"))[:count]
    pipe = build_pipeline(device, len(paths), (300, 300), keep_decoded=True, prefetch=1)

    def run(encoded: list[bytes]):
        pipe.feed_input("encoded", [np.frombuffer(data, np.uint8) for data in encoded])
        network, _, decoded = pipe.run()
        network, decoded = (network, decoded) if device == "cpu" else (network.as_cpu(), decoded.as_cpu())
        return np.array(network.as_array()), [np.array(decoded.at(i)) for i in range(len(decoded))]

    network, decoded = run([path.read_bytes() for path in paths])
    cpu_pictures = [load_image(path) for path in paths]
    cpu_inputs = np.stack([load_one(path, (300, 300)).tensor for path in paths])
    resize = [float(np.abs(network[i] - preprocess(Image.fromarray(decoded[i]))).max()) for i in range(len(paths))]
    decode = [np.abs(decoded[i].astype(np.int16) - np.asarray(picture, np.int16)) for i, picture in enumerate(cpu_pictures)]
    whole = np.abs(network - cpu_inputs)

    def png(picture) -> bytes:
        buffer = io.BytesIO()
        picture.save(buffer, "PNG")
        return buffer.getvalue()

    network_of_cpu_pixels, _ = run([png(picture) for picture in cpu_pictures])
    resize_of_cpu_pixels = np.abs(network_of_cpu_pixels - cpu_inputs)
    return {"images": len(paths),
            "resize_max_abs": max(resize), "resize_within_1e-3": max(resize) <= 1e-3,
            "resize_of_cpu_decoded_max_abs": float(resize_of_cpu_pixels.max()),
            "decode_vs_pillow_max_grey_levels": int(max(d.max() for d in decode)),
            "decode_vs_pillow_mean_grey_levels": float(np.mean([d.mean() for d in decode])),
            "whole_path_vs_cpu_max_abs": float(whole.max()), "whole_path_vs_cpu_mean_abs": float(whole.mean())}


def command(name: str, arguments: list[str], out: Path, timeout: float) -> dict:
    """Run one script, its output kept in out/<name>.log; rc, seconds and the output's last lines."""
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, *arguments], capture_output=True, text=True, timeout=timeout)
        rc, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as error:
        rc, text = 124, f"timed out after {timeout:.0f} s\n{error.stdout or ''}{error.stderr or ''}"
    write_text_atomic(out / f"{name}.log", " ".join(arguments) + "\n" + text)
    return {"command": " ".join(arguments), "rc": rc, "seconds": time.perf_counter() - started,
            "tail": text.strip().splitlines()[-12:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pedestrian-onnx", type=Path, required=True, help="the pedestrian model, core flavour")
    parser.add_argument("--inception-onnx", type=Path, required=True, help="the InceptionV2 stand-in, core FP16")
    parser.add_argument("--voc", type=Path, required=True, help="the VOC2007 folder (JPEGImages, Annotations, ...)")
    parser.add_argument("--image", type=Path, required=True, help="a photo for detect_objects.py")
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and the logs")
    parser.add_argument("--repeat", type=int, default=10, help="passes over the VOC JPEGs in the speed rows")
    parser.add_argument("--skip", default="", help="comma-separated steps to skip: pixels,ap,speed,detect")
    args = parser.parse_args(argv)
    if not dali_installed():
        print("gpu_check: nvidia-dali is not installed; pip install -r requirements-gpu.txt (nvidia-dali-cuda130)")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    report: dict = {"date": time.strftime("%Y-%m-%d")}
    path = args.out / "gpu_check.json"

    def save() -> None:
        write_text_atomic(path, json.dumps(report, indent=1))

    if "pixels" not in skip:
        try:
            report["pixels"] = pixel_check(args.voc, 64)
        except Exception as error:  # noqa: BLE001  (recorded; the other steps still run)
            report["pixels"] = {"error": f"{type(error).__name__}: {error}"}
        print("pixels", json.dumps(report["pixels"]), flush=True)
        save()
    if "ap" not in skip:
        report["ap_bench"] = command("ap_bench", ["-m", "benchmarks.bench_e2e", "--onnx", str(args.pedestrian_onnx),
                                                  "--voc", str(args.voc), "--paths", "cpu,dali",
                                                  "--json", str(args.out / "ap.json")], args.out, 150)
        ap_file = args.out / "ap.json"
        if ap_file.is_file():
            report["ap"] = json.loads(ap_file.read_text()).get("voc")
        report["voc_evaluation_gpu"] = command("voc_evaluation_gpu", [
            "voc_evaluation.py", "--onnx", str(args.pedestrian_onnx), "--decode", "gpu", "-d", str(args.voc), "-f",
            "-b", "64", "-w", str(args.out / "workspace")], args.out, 90)
        print("ap", json.dumps(report.get("ap")), flush=True)
        save()
    if "speed" not in skip:
        report["speed"] = command("speed", [
            "-m", "benchmarks.bench_e2e", "--onnx", str(args.inception_onnx), "--images", str(args.voc / "JPEGImages"),
            "--batches", "128,256", "--repeat", str(args.repeat), "--paths", "cpu,gpu-cuda,gpu,dali",
            "--cuda-graph", "--nhwc", "--json", str(args.out / "e2e.json")], args.out, 300)
        e2e = args.out / "e2e.json"
        if e2e.is_file():
            rows = json.loads(e2e.read_text())["rows"]
            report["speed_summary"] = [
                {"batch": row["batch"], "engine_img_per_s": row["engine_img_per_s"],
                 **{f"{p}_img_per_s": row[p]["img_per_s"] for p in ("cpu", "gpu-cuda", "gpu", "dali") if p in row},
                 "dali_share_of_engine": row["dali"]["img_per_s"] / row["engine_img_per_s"] if "dali" in row else None,
                 "dali_stages": {k: row["dali"][k] for k in ("detect_s", "input_wait_s", "seconds") if "dali" in row}}
                for row in rows]
        print("speed", json.dumps(report.get("speed_summary")), flush=True)
        save()
    if "detect" not in skip:
        report["detect_objects_gpu"] = command("detect_objects_gpu", [
            "detect_objects.py", "--onnx", str(args.pedestrian_onnx), "--decode", "gpu", "-o",
            str(args.out / "detected.jpg"), "-w", str(args.out / "workspace"), str(args.image)], args.out, 60)
        print("detect", report["detect_objects_gpu"]["rc"], flush=True)
        save()
    save()
    print(f"gpu_check: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
