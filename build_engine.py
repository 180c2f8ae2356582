#!/usr/bin/env python3
"""Step 2: build a TensorRT engine from a converted ONNX file (model.py's output).

Needs TensorRT only (no TensorFlow). The engine's sidecar JSON (beside it, same name, .json)
carries the ONNX's description and the TensorRT module that built it, so detect_objects.py
--engine and voc_evaluation.py --engine need nothing else. Prints the engine path last.

Examples:
  python build_engine.py --onnx pedestrian_core.onnx --engine pedestrian.engine -p FP16 -b 8
  python build_engine.py --onnx pedestrian_core.onnx --trt-module tensorrt_rtx --compute-capability 86
"""

import argparse
import logging
import sys
from pathlib import Path

from utils import cli

log = logging.getLogger("build_engine")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, required=True, metavar="FILE", help="the converted ONNX (model.py)")
    parser.add_argument("--engine", type=Path, metavar="FILE",
                        help="engine file to write (default: the cache, WORKSPACE/engines/<model>/<module>/<flavour>/"
                             "{FLOAT,HALF,INT8}/engine_bs_<N>.buf)")
    parser.add_argument("-w", "--workspace", type=Path, default=cli.DEFAULT_WORKSPACE,
                        help="folder of the engine cache (default: %(default)s)")
    cli.add_precision_arg(parser, "engine precision (default: the ONNX's; TensorRT 10 builds FP16 / INT8 from an FP32 "
                                  "ONNX with builder flags, strongly typed modules take the ONNX's)", default=None)
    parser.add_argument("-b", "--max-batch-size", type=int, default=1,
                        help="largest batch the engine takes (its optimisation profile's max; default 1)")
    parser.add_argument("--calib-dir", type=Path, help="TensorRT 10 INT8: calibration JPEGs (default: "
                        "$VOC_DIR/JPEGImages, else images/)")
    cli.add_trt_args(parser)
    parser.add_argument("--timing-cache", type=Path, help="builder timing cache file (default: "
                        "WORKSPACE/engines/timing.cache; unused by TensorRT-RTX)")
    parser.add_argument("--workspace-mb", type=int, default=1024, help="builder workspace in MiB (default 1024)")
    args = parser.parse_args(argv)
    if args.max_batch_size < 1:
        parser.error("--max-batch-size must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging()
    with cli.user_errors():
        from utils.artifact import read_onnx  # noqa: PLC0415
        from utils.engine import EngineSettings, build_from_onnx, default_engine_path  # noqa: PLC0415
        from utils.errors import UserError  # noqa: PLC0415
        from utils.files import check_writable_file  # noqa: PLC0415
        from utils.trt import TrtModule, compute_capability_name, gpu_count, import_trt  # noqa: PLC0415

        cli.check_workspace(args.workspace)
        if args.precision == "BF16":
            raise UserError("-p BF16 runs on the openvino backend (an FP32 ONNX with OpenVINO's bf16 hint); TensorRT "
                            "engines are built FP32, FP16 or INT8")
        if args.engine is not None:
            check_writable_file(args.engine, "--engine")
        onnx = read_onnx(args.onnx)
        trt = import_trt(args.trt_module)
        module = TrtModule.of(trt)
        precision = args.precision or onnx.precision
        if module.strongly_typed and precision != onnx.precision:
            raise UserError(f"{module.label} is strongly typed: the precision comes from the ONNX, which is "
                            f"{onnx.precision}; convert with model.py -p {precision}")
        target = compute_capability_name(args.compute_capability)
        if target and not module.compute_capability_target:
            raise UserError(f"--compute-capability targets TensorRT-RTX builds; {module.label} builds for the GPU "
                            f"present")
        if module.compute_capability_target and target in (None, "CURRENT") and gpu_count() == 0:
            raise UserError("no GPU here to build for; give --compute-capability (e.g. 86 for an RTX 30xx / A10)")
        settings = EngineSettings(precision, args.max_batch_size, args.workspace_mb, target or "CURRENT",
                                  onnx.flavour, onnx.spec.input_size)
        path = args.engine or default_engine_path(args.workspace, onnx, module, precision, args.max_batch_size)
        timing = args.timing_cache or args.workspace / "engines" / "timing.cache"
        log.info(f"{module.label}: {onnx.path} ({onnx.flavour}, {onnx.spec.input_size[0]}x{onnx.spec.input_size[1]}) -> "
                 f"{precision}, max batch {args.max_batch_size}"
                 + (f", compute capability {target}" if module.compute_capability_target else ""))
        build_from_onnx(trt, onnx, settings, path, args.calib_dir, timing)
        print(path)
        return 0


if __name__ == "__main__":
    sys.exit(main())
