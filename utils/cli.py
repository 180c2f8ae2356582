"""Argument groups and error handling shared by the command-line scripts."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before anything imports TensorFlow

from utils.artifact import FLAVOURS, RUN_PRECISIONS  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.models import DEFAULT_MODEL, registry_names  # noqa: E402
from utils.ssd_spec import NmsOverrides  # noqa: E402
from utils.trt import MODULES  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORKSPACE = REPO_ROOT / "workspace"


def add_source_args(parser: argparse.ArgumentParser) -> None:
    """-m MODEL | --onnx FILE | --engine FILE, and -w/--workspace."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-m", "--model", default=None,
                       help=f"a registry name ({', '.join(registry_names())}), a model folder or a .pb file, converted "
                            f"(and built) as needed (default: {DEFAULT_MODEL}, falling back to the pedestrian model "
                            f"when offline)")
    group.add_argument("--onnx", type=Path, metavar="FILE", help="a converted ONNX file (model.py): no TensorFlow needed")
    group.add_argument("--engine", type=Path, metavar="FILE",
                       help="a TensorRT engine built by build_engine.py (its .json sidecar beside it)")
    parser.add_argument("-w", "--workspace", type=Path, default=DEFAULT_WORKSPACE,
                        help="folder for downloaded models, converted graphs, engines and results (default: %(default)s)")
    add_labels_arg(parser)


def add_labels_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", type=Path, metavar="FILE",
                        help="class names: a TF OD API label_map.pbtxt or a text file with one name per line (line 1 = "
                             "class 1; a first line 'background' is skipped). Default: a label_map.pbtxt beside the "
                             "graph (or the one pipeline.config names), the registry's names, COCO for 91 classes; "
                             "with --onnx / --engine the file's own (--labels replaces them for this run)")


def labels_from_args(args: argparse.Namespace) -> dict[int, str] | None:
    """The label map of --labels (a one-line UserError for a bad file), or None."""
    from utils.labels import load_label_file  # noqa: PLC0415

    path = getattr(args, "labels", None)
    return load_label_file(path) if path is not None else None


def add_run_args(parser: argparse.ArgumentParser, batch_size: int) -> None:
    """The options both detect_objects.py and voc_evaluation.py take, with the same names and meanings."""
    parser.add_argument("-b", "--batch-size", type=_at_least_one, default=batch_size,
                        help=f"images per inference batch, and the engine's maximum batch (default {batch_size})")
    add_precision_arg(parser, "inference precision (default: FP32, on openvino BF16 where the CPU has it; or the "
                              "given file's)", default=None)
    add_flavour_arg(parser)
    add_decode_arg(parser)
    parser.add_argument("--calib-dir", type=Path, default=None,
                        help="-p INT8: calibration images (JPEG, PNG), not ones you evaluate (default: the project's "
                             "images/)")
    group = parser.add_argument_group("runtime options")
    group.add_argument("--cuda-graph", action="store_true",
                       help="ONNX Runtime on CUDA: capture a CUDA graph (batches padded to -b)")
    group.add_argument("--nhwc", action="store_true", help="ONNX Runtime on CUDA: prefer NHWC convolutions")
    add_trt_args(parser)
    add_nms_args(parser)


def add_precision_arg(parser: argparse.ArgumentParser, help_text: str, default: str | None) -> None:
    parser.add_argument("-p", "--precision", choices=RUN_PRECISIONS, default=default,
                        help=help_text + "; BF16: the openvino backend on an FP32 file (a CPU with BF16 arithmetic)")


def add_flavour_arg(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    choices = FLAVOURS if default != "auto" else (*FLAVOURS, "auto")
    parser.add_argument("--flavour", choices=choices, default=default,
                        help="ONNX flavour: portable (standard ONNX ops), trt-plugins (GridAnchor/FlattenConcat/NMS_TRT; "
                             "onnxruntime runs plugin/'s reference ops), core (no NMS inside; batched NMS after it)"
                             + (", auto (portable for onnxruntime and openvino; for tensorrt trt-plugins up to TRT 10, "
                                "portable for "
                                "11, core for TensorRT-RTX; a file's own flavour)" if default == "auto" else "")
                             + " (default: %(default)s)")


def add_decode_arg(parser: argparse.ArgumentParser) -> None:
    from utils.pipeline import DECODE_CHOICES  # noqa: PLC0415

    parser.add_argument("--decode", choices=DECODE_CHOICES, default="auto",
                        help="where JPEGs are decoded and resized: cpu (Pillow + numpy, threads), gpu (NVIDIA DALI "
                             "when installed, else nvJPEG via nvImageCodec or torchvision; resize and NMS on the GPU, "
                             "the batch handed to the engine on the device; onnxruntime on CUDA or tensorrt; with --ray "
                             "each GPU actor decodes on its GPU), auto (default: gpu when both are there, else cpu)")


def add_trt_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TensorRT")
    group.add_argument("--trt-module", choices=MODULES, default=None,
                       help="TensorRT module (default: the engine's, else the one installed, tensorrt first)")
    group.add_argument("--compute-capability", default=None, metavar="CC",
                       help="TensorRT-RTX: build for this compute capability (86, 8.6 or SM86; default: the GPU present)")


def add_evaluation_args(parser: argparse.ArgumentParser, measure: str) -> None:
    """What voc_evaluation.py and eval_coco.py share: [BACKEND], the source and run options, decode workers,
    --compare / --tolerance (on ``measure``, e.g. "mAP") and Ray."""
    from utils.runtime import BACKENDS  # noqa: PLC0415

    parser.add_argument("backend", nargs="?", choices=("auto", *BACKENDS), default="auto",
                        help="the backend to evaluate (default auto: tensorrt with a GPU and TensorRT, else "
                             "onnxruntime with CUDA, else openvino, else onnxruntime, else tensorflow; an engine "
                             "always runs on tensorrt)")
    add_source_args(parser)
    add_run_args(parser, batch_size=64)
    parser.add_argument("-j", "--workers", type=int, default=None,
                        help="decode/resize worker threads (default: one per core)")
    parser.add_argument("--compare", choices=BACKENDS, help="also evaluate this backend (same model) and compare")
    parser.add_argument("--tolerance", type=float, default=0.5,
                        help=f"largest |{measure} difference| in points that --compare accepts (default 0.5; a NaN "
                             f"never passes)")
    add_ray_args(parser)


def check_evaluation_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks and defaults that go with add_evaluation_args (and --limit)."""
    from utils.pipeline import default_workers  # noqa: PLC0415

    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.workers is None:
        args.workers = default_workers()


def add_voc_args(parser: argparse.ArgumentParser, limit: int | None = None) -> None:
    parser.add_argument("-d", "--voc-dir", type=Path, default=None,
                        help="VOCdevkit/VOC2007 folder (default: $VOC_DIR, else WORKSPACE/VOCdevkit/VOC2007)")
    parser.add_argument("--limit", type=int, default=limit,
                        help="the first N image ids only" + (f" (default {limit})" if limit else ""))


def voc_dataset(args: argparse.Namespace, split: str = "test"):
    """The VOC dataset that -d/--voc-dir and --limit name (one-line UserError when it is missing)."""
    from utils.voc import default_voc_dir, load_dataset  # noqa: PLC0415

    return load_dataset(args.voc_dir or default_voc_dir(args.workspace), split, args.limit)


def _nms_value(name: str, kind: type):
    """An argparse type for one NMS option: its range is utils.ssd_spec's, as for pipeline.config."""
    from utils.ssd_spec import check_value  # noqa: PLC0415

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        why = check_value(name, value)
        if why:
            raise argparse.ArgumentTypeError(f"{text} {why}")
        return value

    convert.__name__ = kind.__name__
    return convert


def add_nms_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("NMS (defaults: the graph's / pipeline.config's values)")
    group.add_argument("--score-threshold", type=_nms_value("score_threshold", float),
                       help="confidence below which boxes are dropped before NMS, in [0, 1)")
    group.add_argument("--iou-threshold", type=_nms_value("iou_threshold", float),
                       help="IoU above which a box is suppressed, in (0, 1]")
    group.add_argument("--top-k", type=_nms_value("top_k", int), help="boxes kept per class (at least 1)")
    group.add_argument("--keep-top-k", type=_nms_value("keep_top_k", int), help="boxes kept per image (at least 1)")


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_ray_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Ray cluster (pip install -r requirements-distributed.txt)")
    group.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help="run on a Ray cluster: no ADDRESS starts a local one, 'auto' joins the running one")
    group.add_argument("--ray-workers", type=_at_least_one, default=None, metavar="N",
                       help="detector actors (default: one per GPU of the cluster, else one per CPU)")


def check_ray(args: argparse.Namespace) -> None:
    """With --ray, Ray must be installed and a cluster address must answer: checked before anything is
    converted or built."""
    if getattr(args, "ray", None):
        from utils.distributed import check_address, import_ray  # noqa: PLC0415

        import_ray()
        if args.ray != "local":
            check_address(args.ray)


def check_workspace(workspace: Path) -> None:
    """-w/--workspace must be a folder (or not exist yet): a one-line UserError for a file."""
    workspace = Path(workspace)
    if workspace.exists() and not workspace.is_dir():
        raise UserError(f"-w/--workspace '{workspace}' is a file, not a folder; give a folder (default: "
                        f"{DEFAULT_WORKSPACE})")


def nms_overrides(args: argparse.Namespace) -> NmsOverrides:
    return NmsOverrides(args.score_threshold, args.iou_threshold, args.top_k, args.keep_top_k)


def plan_from_args(args: argparse.Namespace, backend: str | None = None):
    """The Plan (utils.plan) of a script's arguments; ``backend`` overrides args.backend."""
    from utils.plan import Plan  # noqa: PLC0415

    check_workspace(args.workspace)
    return Plan.resolve(model=args.model, onnx=args.onnx, engine=args.engine, workspace=args.workspace,
                        backend=backend or args.backend, flavour=args.flavour, precision=args.precision,
                        batch_size=args.batch_size, decode=args.decode, nms=nms_overrides(args),
                        cuda_graph=args.cuda_graph, nhwc=args.nhwc, trt_module=args.trt_module,
                        compute_capability=args.compute_capability, calib_dir=getattr(args, "calib_dir", None),
                        labels=labels_from_args(args))


class _Format(logging.Formatter):
    """Progress as plain lines; warnings and errors prefixed as the scripts' one-line messages are."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        return f"warning: {message}" if record.levelno >= logging.WARNING else message


def setup_logging(verbose: bool = False) -> None:
    """Messages go to stderr through the standard logging module, so that stdout stays parseable."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("ray", "tensorflow", "tf2onnx", "onnx_graphsurgeon"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.showwarning = _warning_line


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning (a library's, e.g. Pillow's) as one ``warning: ...`` line, not its source line."""
    text = " ".join(str(message).split())
    logging.getLogger("py.warnings").warning(f"{text} ({category.__name__})")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a UserError into one ``error: ...`` line and its exit code."""
    try:
        yield
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
