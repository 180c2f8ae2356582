"""Argument groups and error handling shared by the command-line scripts."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before anything imports TensorFlow

from utils.converter import NmsOverrides  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.models import DEFAULT_MODEL, registry_names  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORKSPACE = REPO_ROOT / "workspace"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", default=None,
                        help=f"a registry name ({', '.join(registry_names())}), a model folder or a .pb file "
                             f"(default: {DEFAULT_MODEL}, falling back to the pedestrian model when offline)")
    parser.add_argument("-w", "--workspace", type=Path, default=DEFAULT_WORKSPACE,
                        help="folder for downloaded models, converted graphs and results (default: %(default)s)")


class _AutoIsNone(argparse.Action):
    """Stores None for "auto": each backend then picks its own default flavour."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, None if values == "auto" else values)


def add_flavour_arg(parser: argparse.ArgumentParser) -> None:
    from utils.onnx_export import FLAVOURS  # noqa: PLC0415

    parser.add_argument("--flavour", choices=(*FLAVOURS, "auto"), default=None, action=_AutoIsNone,
                        help="ONNX flavour the converted backends run: portable (standard ONNX ops), "
                             "trt-plugins (GridAnchor/FlattenConcat/NMS_TRT; onnxruntime runs plugin/'s reference "
                             "ops), core (no NMS inside; batched NMS after, on the GPU with --decode gpu), auto (default: portable for "
                             "onnxruntime; for tensorrt trt-plugins up to TRT 10, portable for 11, core for RTX)")


def add_decode_arg(parser: argparse.ArgumentParser) -> None:
    from utils.pipeline import DECODE_CHOICES  # noqa: PLC0415

    parser.add_argument("--decode", choices=DECODE_CHOICES, default="auto",
                        help="where JPEGs are decoded and resized: cpu (Pillow + numpy, threads), gpu (nvJPEG on "
                             "the GPU's hardware engines via nvImageCodec, else on CUDA via torchvision; resize and "
                             "NMS on the GPU, the batch handed to the engine on the device; needs the onnxruntime "
                             "backend on CUDA), auto (default: gpu when both are there, else cpu)")


def check_decode_arg(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--decode gpu needs this process: Ray's workers decode on the CPU."""
    if getattr(args, "ray", None) and args.decode == "gpu":
        parser.error("--decode gpu runs in this process; Ray workers decode on the CPU (drop --decode gpu or --ray)")


def add_trt_module_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trt-module", choices=("tensorrt", "tensorrt_rtx"), default=None,
                        help="TensorRT module for --backend tensorrt (default: $SSD_TRT_MODULE, else the one "
                             "installed, tensorrt first)")


def apply_trt_module(args: argparse.Namespace) -> None:
    """--trt-module wins over $SSD_TRT_MODULE, which utils.engine.import_trt reads."""
    if getattr(args, "trt_module", None):
        os.environ["SSD_TRT_MODULE"] = args.trt_module


def add_voc_args(parser: argparse.ArgumentParser, limit: int | None = None) -> None:
    parser.add_argument("-d", "--voc-dir", type=Path, default=None,
                        help="VOCdevkit/VOC2007 folder (default: $VOC_DIR, else WORKSPACE/VOCdevkit/VOC2007)")
    parser.add_argument("--limit", type=int, default=limit,
                        help="the first N image ids only" + (f" (default {limit})" if limit else ""))


def voc_dataset(args: argparse.Namespace, split: str = "test"):
    """The VOC dataset that -d/--voc-dir and --limit name (one-line UserError when it is missing)."""
    from utils.voc import default_voc_dir, load_dataset  # noqa: PLC0415

    return load_dataset(args.voc_dir or default_voc_dir(args.workspace), split, args.limit)


def add_nms_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("NMS (defaults: the graph's / pipeline.config's values)")
    group.add_argument("--score-threshold", type=float, help="confidence below which boxes are dropped before NMS")
    group.add_argument("--iou-threshold", type=float, help="IoU above which a box is suppressed")
    group.add_argument("--top-k", type=int, help="boxes kept per class")
    group.add_argument("--keep-top-k", type=int, help="boxes kept per image")


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


def ray_address(args: argparse.Namespace) -> str | None:
    """The address ray.init takes for --ray: None starts a local cluster."""
    return None if args.ray == "local" else args.ray


def nms_overrides(args: argparse.Namespace) -> NmsOverrides:
    return NmsOverrides(args.score_threshold, args.iou_threshold, args.top_k, args.keep_top_k)


def log(message: str) -> None:
    """Progress lines go to stderr so that stdout stays parseable."""
    print(message, file=sys.stderr, flush=True)


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
