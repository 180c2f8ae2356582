#!/usr/bin/env python3
"""Parse and build every model x flavour x precision x batch profile with the installed TensorRT module.

The ONNX of each model, flavour and precision is converted as model.py converts it (utils.converter,
cached beside the model; it carries its own description), then parsed and built as build_engine.py
builds it (utils.engine, here in memory: no engine is written). Prints a table (parsed, built, build
seconds, engine MB, layers and their output precisions, or the one-line reason) and writes it as
JSON. Works without a GPU with TensorRT-RTX (compute-capability target). Run from the repository root:

  python -m benchmarks.trt_build_check [-w WORKSPACE] [--trt-module tensorrt_rtx] [--compute-capability SM86]
  python -m benchmarks.trt_build_check --flavours core --precisions FP32 --batches 1 --json /tmp/check.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.common import comma_choices
from utils import cli, converter
from utils.artifact import FLAVOURS, PRECISIONS
from utils.engine import EngineSettings, build_engine, parse_onnx
from utils.errors import UserError
from utils.models import PEDESTRIAN_MODEL, resolve_model
from utils.trt import MODULES, TrtModule, compute_capability_name, import_trt

BATCHES = (1, 64)
INCEPTION = "ssd_inception_v2_coco_random"


@dataclass
class Row:
    model: str
    flavour: str
    precision: str
    batch: str
    parsed: bool = False
    built: bool = False
    seconds: float | None = None
    engine_mb: float | None = None
    layers: int | None = None
    precisions: dict = field(default_factory=dict)
    reason: str = ""


def network_summary(trt, onnx_path: Path, settings: EngineSettings) -> tuple[int, dict]:
    """Layers of the parsed network and a count of their output data types."""
    _, network, _, _ = parse_onnx(trt, onnx_path, settings)
    types = collections.Counter(network.get_layer(i).get_output_type(0).name for i in range(network.num_layers))
    return network.num_layers, dict(types)


def check(trt, model, flavour: str, precision: str, batch: int, compute_capability: str) -> Row:
    row = Row(model.name, flavour, precision, "1" if batch == 1 else f"1..{batch}")
    settings = EngineSettings(precision, batch, compute_capability=compute_capability, flavour=flavour)
    try:
        # model.py's step: the ONNX variant this module builds from (FP32 + builder flags on TensorRT 10)
        onnx = converter.convert(model, flavour, settings.onnx_precision(TrtModule.of(trt))).artifact
        settings = EngineSettings(precision, batch, compute_capability=compute_capability, flavour=onnx.flavour,
                                  input_size=onnx.spec.input_size)
        row.layers, row.precisions = network_summary(trt, onnx.path, settings)
        row.parsed = True
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch:
            data = build_engine(trt, onnx.path, settings, timing_cache_path=Path(scratch) / "timing.cache")
        row.seconds = round(time.perf_counter() - start, 2)
        row.built, row.engine_mb = True, round(len(data) / 2**20, 2)
    except UserError as exc:
        row.reason = str(exc)
    return row


def skip_reason(flavour: str, precision: str) -> str | None:
    try:
        converter.check_options(flavour, precision)
    except UserError as exc:
        return f"converter refuses it: {exc}"
    return None


def models(workspace: Path) -> list:
    found = [resolve_model(PEDESTRIAN_MODEL, workspace)]
    inception = workspace / "models" / INCEPTION
    if (inception / "frozen_inference_graph.pb").exists():
        found.append(resolve_model(str(inception), workspace))
    else:
        print(f"skipped {INCEPTION}: {inception} has no frozen graph (build it with "
              f"../shared/models/make_inception_v2_random.py, see ../shared/README.md)")
    return found


def print_table(rows: list[Row]) -> None:
    print(f"{'model':34} {'flavour':11} {'prec':4} {'batch':6} parsed built {'s':>6} {'MB':>6} layers  detail")
    for r in rows:
        detail = r.reason or ", ".join(f"{k} {v}" for k, v in sorted(r.precisions.items()))
        print(f"{r.model:34} {r.flavour:11} {r.precision:4} {r.batch:6} {str(r.parsed):6} {str(r.built):5} "
              f"{r.seconds if r.seconds is not None else '-':>6} {r.engine_mb if r.engine_mb is not None else '-':>6} "
              f"{r.layers if r.layers is not None else '-':>6}  {detail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trt_build_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-w", "--workspace", type=Path, default=cli.DEFAULT_WORKSPACE,
                        help="folder of the models and converted graphs (default: %(default)s)")
    parser.add_argument("--trt-module", choices=MODULES, default=None,
                        help="TensorRT module (default: the first installed of tensorrt, tensorrt_rtx)")
    parser.add_argument("--compute-capability", default="SM86",
                        help="TensorRT-RTX build target (86, 8.6 or SM86; default SM86)")
    parser.add_argument("--flavours", type=comma_choices(FLAVOURS), default=list(FLAVOURS),
                        help=f"comma-separated (default: {','.join(FLAVOURS)})")
    parser.add_argument("--precisions", type=comma_choices(PRECISIONS), default=list(PRECISIONS),
                        help=f"comma-separated (default: {','.join(PRECISIONS)})")
    parser.add_argument("--batches", type=comma_choices(BATCHES, int), default=list(BATCHES),
                        help=f"profiles 1..N, comma-separated (default: {','.join(map(str, BATCHES))})")
    parser.add_argument("--json", type=Path, default=None, help="default: WORKSPACE/trt_build_check.json")
    args = parser.parse_args(argv)
    cli.setup_logging()

    with cli.user_errors():
        trt = import_trt(args.trt_module)
        label = TrtModule.of(trt).label
        compute_capability = compute_capability_name(args.compute_capability)
        print(f"TensorRT module: {label}")
        rows = []
        for model in models(args.workspace):
            for flavour in args.flavours:
                for precision in args.precisions:
                    reason = skip_reason(flavour, precision)
                    if reason:
                        print(f"skipped {model.name} {flavour} {precision}: {reason}")
                        continue
                    rows += [check(trt, model, flavour, precision, b, compute_capability) for b in args.batches]
    print_table(rows)
    out = args.json or args.workspace / "trt_build_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"trt": label, "rows": [asdict(r) for r in rows]}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
