"""VOC evaluation of one backend: detections (run or cached), AP table, PR curves."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from utils.files import atomic_path, write_text_atomic
from utils.labels import COCO_TO_VOC, VOC_CLASSES
from utils.voc import ClassAp, Detection, VocDataset, detections_to_voc, read_results, write_results

RESULTS_KEY = "run.json"


@dataclass
class RunStats:
    """How a set of detections was obtained."""

    images: int
    failed: list[str]                 # one-line reasons for images that could not be read
    seconds: float                    # end to end: decode + preprocess + inference + bookkeeping
    inference_seconds: float
    cached: bool = False
    decode: str = "cpu"               # where the JPEGs were decoded: cpu | gpu
    cpu_decoded: int = 0              # decode gpu: images the CPU decoded instead (not JPEG, CMYK, ...)

    @property
    def end_to_end_fps(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")

    @property
    def inference_fps(self) -> float:
        return self.images / self.inference_seconds if self.inference_seconds else float("nan")


def results_dir(workspace: Path, model_name: str, backend: str, flavour: str | None, precision: str) -> Path:
    return workspace / "results" / model_name / backend / (flavour or "frozen") / precision


def detectable_classes(label_map: dict[int, str]) -> set[str]:
    """VOC classes that some label of the model maps to."""
    return {COCO_TO_VOC[name] for name in label_map.values() if name in COCO_TO_VOC}


def run_key(dataset: VocDataset, plan_key: dict) -> dict:
    """What the cached detections depend on: the images and the plan's key (utils.plan.Plan.key)."""
    ids = hashlib.sha256(" ".join(image.image_id for image in dataset.images).encode()).hexdigest()
    return {"voc_dir": str(dataset.root.resolve()), "split": dataset.split, "image_ids_sha256": ids, "run": plan_key}


def load_cached(folder: Path, split: str, key: dict) -> tuple[dict[str, list[Detection]], RunStats] | None:
    """The detections saved by an earlier identical run, or None."""
    key_path = folder / RESULTS_KEY
    if not key_path.is_file():
        return None
    saved = json.loads(key_path.read_text(encoding="utf-8"))
    if saved.get("key") != key:
        return None
    stats = RunStats(**{**saved["stats"], "cached": True})
    return read_results(folder, split), stats


def run_detections(executor, dataset: VocDataset, label_map: dict[int, str], decode: str = "cpu",
                   desc: str = "detect") -> tuple[dict[str, list[Detection]], RunStats]:
    """Detect on every image of the dataset through ``executor`` (utils.run); returns detections by VOC class
    and the timing."""
    by_class: dict[str, list[Detection]] = {name: [] for name in VOC_CLASSES}
    failed, inference, cpu_decoded = [], 0.0, 0
    started = time.perf_counter()
    with tqdm(total=len(dataset.images), desc=desc, unit="img", file=sys.stderr) as progress:
        for batch in executor.batches([image.path for image in dataset.images],
                                      [image.image_id for image in dataset.images]):
            inference += batch.inference_seconds
            cpu_decoded += batch.cpu_decoded
            for result in batch.results:
                if result.error is not None:
                    failed.append(result.error)
                    continue
                for name, found in detections_to_voc(result.rows, *result.size, label_map).items():
                    by_class[name].extend((result.key, *map(float, row)) for row in found)
            progress.update(len(batch.results))
    stats = RunStats(images=len(dataset.images) - len(failed), failed=failed,
                     seconds=time.perf_counter() - started, inference_seconds=inference,
                     decode=decode, cpu_decoded=cpu_decoded)
    return by_class, stats


def save_detections(folder: Path, split: str, key: dict, detections: dict[str, list[Detection]],
                    stats: RunStats) -> dict[str, list[Detection]]:
    """Write the devkit files, then the key (last, so a torn run is never taken as cached); read back."""
    (folder / RESULTS_KEY).unlink(missing_ok=True)
    write_results(folder, split, detections)
    write_text_atomic(folder / RESULTS_KEY, json.dumps({"key": key, "stats": asdict(stats)}, indent=1))
    return read_results(folder, split)


def ap_lines(results: list[ClassAp], detectable: set[str]) -> list[str]:
    """The per-class table: ``class: AP`` (or n/a)."""
    width = max(len(name) for name in VOC_CLASSES)
    return [f"{r.name:<{width}}: {r.ap:.4f}" if r.ap is not None and r.name in detectable
            else f"{r.name:<{width}}: n/a" for r in results]


def compare_lines(ours: list[ClassAp], theirs: list[ClassAp], our_name: str, their_name: str,
                  detectable: set[str]) -> list[str]:
    """Side-by-side AP of two backends with the difference in AP points."""
    width = max(len(name) for name in VOC_CLASSES)
    lines = [f"{'class':<{width}}  {our_name:>12}  {their_name:>12}  {'delta (pts)':>11}"]
    for mine, other in zip(ours, theirs):
        if mine.ap is None or other.ap is None or mine.name not in detectable:
            lines.append(f"{mine.name:<{width}}  {'n/a':>12}  {'n/a':>12}  {'':>11}")
        else:
            lines.append(f"{mine.name:<{width}}  {mine.ap:>12.4f}  {other.ap:>12.4f}  "
                         f"{(mine.ap - other.ap) * 100:>+11.2f}")
    return lines


def plot_pr_curves(results: list[ClassAp], detectable: set[str], title: str, path: Path) -> Path:
    """One PNG with a precision/recall curve per detectable class (matplotlib, written atomically)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axes = plt.subplots(figsize=(7, 6), dpi=110)
    for result in results:
        if result.ap is not None and result.name in detectable and len(result.recall):
            axes.plot(result.recall, result.precision, label=f"{result.name} (AP {result.ap:.3f})")
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left", fontsize="small")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return path


def log_skipped(dataset: VocDataset, stats: RunStats) -> None:
    for reason in dataset.skipped + stats.failed:
        logging.getLogger(__name__).warning("skipped %s", reason)
