#!/usr/bin/env python3
"""Convert a TF Object Detection API SSD frozen graph into a deployable ONNX graph.

Prints the path of the ONNX file as its last line.
"""

import argparse
import sys
from pathlib import Path

from utils import cli
from utils.converter import PRECISIONS, check_options, convert
from utils.models import resolve_model
from utils.onnx_export import FLAVOURS
from utils.precision import calibration_images


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(parser)
    parser.add_argument("-o", "--output", type=Path, help="ONNX file to write (default: "
                        "WORKSPACE/models/<model>/<model>_<flavour>_<precision>.onnx)")
    parser.add_argument("--flavour", choices=FLAVOURS, default="portable",
                        help="portable: standard ONNX ops (NonMaxSuppression; default); trt-plugins: "
                             "GridAnchor_TRT/FlattenConcat_TRT/NMS_TRT nodes; core: no NMS inside")
    parser.add_argument("-p", "--precision", choices=("FP32", "FP16", "INT8"), default="FP32",
                        help=f"available now: {', '.join(PRECISIONS)}")
    parser.add_argument("-f", "--force", action="store_true", help="convert even if a cached ONNX matches")
    parser.add_argument("--calib-dir", type=Path, help="INT8 calibration JPEGs (default: $VOC_DIR/JPEGImages, "
                        "else images/)")
    cli.add_nms_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with cli.user_errors():
        check_options(args.flavour, args.precision)
        model = resolve_model(args.model, args.workspace)
        cli.log(f"Converting {model.graph_path} ({args.flavour}, {args.precision})...")
        calibration = calibration_images(args.calib_dir) if args.precision == "INT8" else None
        converted = convert(model, args.flavour, args.precision, cli.nms_overrides(args), args.output, args.force,
                            calibration)
        spec = converted.spec
        state = f"converted in {converted.seconds:.1f} s" if converted.built else "cached, up to date"
        cli.log(f"{spec.num_classes} classes (with background), {spec.num_anchors} anchors on feature maps "
                f"{'/'.join(str(h) for h, _ in spec.anchors.feature_map_shapes)}, "
                f"NMS IoU {spec.nms.iou_threshold:g}, keepTopK {spec.nms.keep_top_k} — {state}")
        print(converted.onnx_path)
        return 0


if __name__ == "__main__":
    sys.exit(main())
