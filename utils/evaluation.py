"""Evaluation of one backend: detections (run or cached), AP table, PR curves, and the gate (a NaN
AP, no evaluated image or a comparison with a NaN side fails)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from utils.errors import EXIT_OK, EXIT_SOME_INPUTS_FAILED
from utils.files import atomic_path, write_text_atomic
from utils.labels import LABELS_HINT, VOC_CLASSES, voc_class
from utils.pipeline import DECODE_NAMES
from utils.voc import (ClassAp, Detection, VocDataset, detections_to_voc, read_results, result_paths,
                       write_results)

log = logging.getLogger(__name__)

RESULTS_KEY = "run.json"
RESULTS_FORMAT = 2   # run.json: {"format", "key", "stats", "files": {name: {"size", "sha256"}}}


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
    failed_ids: list[str] = field(default_factory=list)   # the keys (image ids) of the failed images

    @property
    def end_to_end_fps(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")

    @property
    def inference_fps(self) -> float:
        return self.images / self.inference_seconds if self.inference_seconds else float("nan")


def results_dir(workspace: Path, model_name: str, backend: str, flavour: str | None, precision: str) -> Path:
    return workspace / "results" / model_name / backend / (flavour or "frozen") / precision


def detectable_classes(label_map: dict[int, str]) -> set[str]:
    """VOC classes that some label of the model maps to (by name: utils.labels.voc_class)."""
    return {found for name in label_map.values() if (found := voc_class(name)) is not None}


def check_detectable(label_map: dict[int, str], model: str, num_classes: int) -> set[str]:
    """detectable_classes, or a one-line UserError (exit 2) when none of the model's classes is a VOC class."""
    detectable = detectable_classes(label_map)
    if not detectable:
        from utils.errors import UserError  # noqa: PLC0415
        from utils.labels import label_name  # noqa: PLC0415

        names = [label_name(label_map, label) for label in range(1, num_classes)]
        shown = ", ".join(names[:8]) + (f", ... ({len(names)})" if len(names) > 8 else "")
        raise UserError(f"none of the classes of {model} ({shown}) is a VOC class, so there is nothing to evaluate; "
                        f"{LABELS_HINT}")
    return detectable


def run_key(dataset: VocDataset, plan_key: dict) -> dict:
    """What the cached detections depend on: the images and the plan's key (utils.plan.Plan.key)."""
    ids = hashlib.sha256(" ".join(image.image_id for image in dataset.images).encode()).hexdigest()
    return {"voc_dir": str(dataset.root.resolve()), "split": dataset.split, "image_ids_sha256": ids, "run": plan_key}


def _fingerprint(path: Path) -> dict:
    data = path.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _cached_run(saved: object, key: dict) -> tuple[RunStats, dict] | None:
    """Stats and recorded files of a run.json of this key; None when it is another run's; ValueError
    (or TypeError) when it is not a run.json we write."""
    if not isinstance(saved, dict) or saved.get("format") != RESULTS_FORMAT:
        raise ValueError("not a run.json of this version")
    if saved.get("key") != key:
        return None
    stats, files = saved.get("stats"), saved.get("files")
    if not isinstance(stats, dict) or not isinstance(files, dict):
        raise ValueError("no stats or files")
    if not all(isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
               for entry in files.values()):
        raise ValueError("a file without size and sha256")
    stats = RunStats(**{**stats, "cached": True})
    if not (isinstance(stats.images, int) and isinstance(stats.cpu_decoded, int) and stats.decode in DECODE_NAMES
            and all(isinstance(v, (int, float)) for v in (stats.seconds, stats.inference_seconds))
            and all(isinstance(v, list) and all(isinstance(item, str) for item in v)
                    for v in (stats.failed, stats.failed_ids))):
        raise ValueError("stats of the wrong types")
    return stats, files


def _changed_file(folder: Path, split: str, files: dict) -> str | None:
    """Why the result files differ from those run.json recorded, or None when they are the same."""
    for path in result_paths(folder, split):
        recorded = files.get(path.name)
        if recorded is None:
            return f"{path.name} is not recorded"
        if not path.is_file():
            return f"{path.name} is missing"
        size = path.stat().st_size
        if size != recorded["size"]:
            return f"{path.name} has {size} bytes, {recorded['size']} recorded"
        if _fingerprint(path)["sha256"] != recorded["sha256"]:
            return f"{path.name} differs from its recorded sha256"
    return None


def load_cached(folder: Path, split: str, key: dict) -> tuple[dict[str, list[Detection]], RunStats] | None:
    """The detections saved by an earlier identical run, or None (run again).

    A run.json that cannot be read or is not of the shape :func:`save_detections` writes means "not
    cached"; result files whose size or sha256 differ from those it recorded (cut short, edited) are
    not reused either: one line says so.
    """
    key_path = folder / RESULTS_KEY
    if not key_path.is_file():
        return None
    try:
        cached = _cached_run(json.loads(key_path.read_text(encoding="utf-8")), key)
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as error:
        log.info(f"Not using the cached detections in {folder}: malformed {RESULTS_KEY} ({error}); running again")
        return None
    if cached is None:
        return None
    stats, files = cached
    changed = _changed_file(folder, split, files)
    if changed is not None:
        log.warning(f"cached detections in {folder} do not match {RESULTS_KEY} ({changed}); running again")
        return None
    return read_results(folder, split), stats


def detect_images(executor, paths: list[Path], keys: list[str], handle, decode: str = "cpu",
                  desc: str = "detect") -> RunStats:
    """Detect on every image through ``executor`` (utils.run), calling ``handle(result)`` for each one that
    was read (ImageResult: key, size, rows); returns the counts and the timing."""
    failed, failed_ids, inference, cpu_decoded = [], [], 0.0, 0
    started = time.perf_counter()
    with tqdm(total=len(paths), desc=desc, unit="img", file=sys.stderr) as progress:
        for batch in executor.batches(paths, keys):
            inference += batch.inference_seconds
            cpu_decoded += batch.cpu_decoded
            for result in batch.results:
                if result.error is not None:
                    failed.append(result.error)
                    failed_ids.append(result.key)
                else:
                    handle(result)
            progress.update(len(batch.results))
    return RunStats(images=len(paths) - len(failed), failed=failed, seconds=time.perf_counter() - started,
                    inference_seconds=inference, decode=decode, cpu_decoded=cpu_decoded, failed_ids=failed_ids)


def run_detections(executor, dataset: VocDataset, label_map: dict[int, str], decode: str = "cpu",
                   desc: str = "detect") -> tuple[dict[str, list[Detection]], RunStats]:
    """Detect on every image of the dataset through ``executor`` (utils.run); returns detections by VOC class
    (the devkit's 1-based pixels) and the timing."""
    by_class: dict[str, list[Detection]] = {name: [] for name in VOC_CLASSES}

    def collect(result) -> None:
        for name, found in detections_to_voc(result.rows, *result.size, label_map).items():
            by_class[name].extend((result.key, *map(float, row)) for row in found)

    stats = detect_images(executor, [image.path for image in dataset.images],
                          [image.image_id for image in dataset.images], collect, decode, desc)
    return by_class, stats


def save_detections(folder: Path, split: str, key: dict, detections: dict[str, list[Detection]],
                    stats: RunStats) -> dict[str, list[Detection]]:
    """Write the devkit files, then the key with the size and sha256 of each (last, so a torn run is never
    taken as cached); read back."""
    (folder / RESULTS_KEY).unlink(missing_ok=True)
    paths = write_results(folder, split, detections)
    files = {path.name: _fingerprint(path) for path in paths}
    write_text_atomic(folder / RESULTS_KEY, json.dumps({"format": RESULTS_FORMAT, "key": key, "stats": asdict(stats),
                                                        "files": files}, indent=1))
    return read_results(folder, split)


def plans_to_compare(args) -> list:
    """The plan of a script's arguments, and with --compare BACKEND the same model on that backend (the
    tensorflow reference runs the frozen graph as exported)."""
    import argparse  # noqa: PLC0415

    from utils import cli  # noqa: PLC0415

    plans = [cli.plan_from_args(args)]
    if args.compare and args.compare != plans[0].backend:
        other = argparse.Namespace(**{**vars(args), "backend": args.compare})
        if args.compare == "tensorflow":
            other.precision, other.flavour = None, "auto"
        plans.append(cli.plan_from_args(other))
    return plans


def exit_code(problems: list[str | None], passed: bool) -> int:
    """An evaluation's exit code: the problems (a NaN AP, nothing evaluated) as one ``error:`` line and exit 1,
    else 1 when --compare failed, else 0."""
    problems = [problem for problem in problems if problem]
    if problems:
        logging.getLogger(__name__).error("; ".join(problems))
        return EXIT_SOME_INPUTS_FAILED
    return EXIT_OK if passed else EXIT_SOME_INPUTS_FAILED


def is_nan(value: float | None) -> bool:
    return value is not None and math.isnan(value)


def comparison(ours: float, theirs: float, tolerance: float, what: str = "mAP") -> tuple[str, bool]:
    """The verdict line of --compare (values in 0..1, tolerance in points) and whether it passes; a NaN
    side never passes (``abs(nan) > tol`` is False, so it is checked first)."""
    if is_nan(ours) or is_nan(theirs):
        return f"{what} {ours:.4f} vs {theirs:.4f}: cannot compare a NaN {what}, FAILED", False
    delta = round((ours - theirs) * 100, 2) + 0.0   # no "-0.00"
    verdict = "within" if abs(delta) <= tolerance else "OUTSIDE"
    return (f"{what} {ours:.4f} vs {theirs:.4f}: delta {delta:+.2f} points, {verdict} the tolerance of "
            f"{tolerance} points"), abs(delta) <= tolerance


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
