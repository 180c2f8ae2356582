#!/usr/bin/env python3
"""Step 1: convert a TF Object Detection API SSD frozen graph into a deployable ONNX graph.

The ONNX carries its own description (spec, flavour, precision, label map) in its metadata, so
build_engine.py, detect_objects.py --onnx and voc_evaluation.py --onnx need nothing else, and no
TensorFlow. Prints the path of the ONNX file as its last line.

Example:
  python model.py -m ssdlite_mobilenet_v2_pedestrian --flavour core -o pedestrian_core.onnx
"""

import argparse
import logging
import sys
from pathlib import Path

from utils import cli

log = logging.getLogger("model")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", default=None,
                        help="a registry name, a model folder or a .pb file (default: the sample's default model)")
    parser.add_argument("-w", "--workspace", type=Path, default=cli.DEFAULT_WORKSPACE,
                        help="folder for downloaded and converted models (default: %(default)s)")
    parser.add_argument("-o", "--output", type=Path, help="ONNX file to write (default: "
                        "WORKSPACE/models/<model>/<model>_<flavour>_<precision>.onnx)")
    cli.add_flavour_arg(parser, default="portable")
    cli.add_precision_arg(parser, "FP32 (default), FP16 (network in half precision, edges and post-processing FP32) "
                                  "or INT8 (Q/DQ, calibrated on --calib-dir)", default="FP32")
    parser.add_argument("-f", "--force", action="store_true", help="convert even if a cached ONNX matches")
    parser.add_argument("--calib-dir", type=Path, help="INT8 calibration images, JPEG or PNG (default: images/; "
                        "never the evaluated set)")
    cli.add_labels_arg(parser)
    cli.add_nms_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging()
    with cli.user_errors():
        from utils.converter import check_options, convert  # noqa: PLC0415
        from utils.files import check_writable_file  # noqa: PLC0415
        from utils.models import resolve_model  # noqa: PLC0415
        from utils.quantize import calibration_images  # noqa: PLC0415

        from utils.labels import warn_unnamed  # noqa: PLC0415

        check_options(args.flavour, args.precision)
        cli.check_workspace(args.workspace)
        labels = cli.labels_from_args(args)
        if args.output is not None:
            check_writable_file(args.output, "-o/--output")
        model = resolve_model(args.model, args.workspace)
        calibration = calibration_images(args.calib_dir) if args.precision == "INT8" else None
        converted = convert(model, args.flavour, args.precision, cli.nms_overrides(args), args.output, args.force,
                            calibration, labels)
        spec, labels = converted.spec, converted.artifact.labels
        warn_unnamed(labels, spec.num_classes, model.name)
        maps = "/".join(str(h) if h == w else f"{h}x{w}" for h, w in spec.anchors.feature_map_shapes)
        log.info(f"{spec.num_classes} classes (with background; {len(labels)} named), {spec.num_anchors} "
                 f"{spec.anchors.generator} anchors on feature maps {maps}, input "
                 f"{spec.input_size[0]}x{spec.input_size[1]}, NMS IoU {spec.nms.iou_threshold:g}, "
                 f"keepTopK {spec.nms.keep_top_k}")
        print(converted.onnx_path)
        return 0


if __name__ == "__main__":
    sys.exit(main())
