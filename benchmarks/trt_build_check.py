"""Parse and build every model x flavour x precision x batch profile with the installed TensorRT module.

Prints a table (parsed, built, build seconds, engine MB, layers and their output precisions, or the
one-line reason) and writes it as JSON. Works without a GPU with TensorRT-RTX (compute-capability
target). Usage: python benchmarks/trt_build_check.py [-w WORKSPACE] [--compute-capability SM86] [--json OUT]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import converter, onnx_export  # noqa: E402
from utils.engine import EngineSettings, TrtFlavor, build_engine, import_trt, parse_onnx  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.models import PEDESTRIAN_MODEL, resolve_model  # noqa: E402

FLAVOURS = ("portable", "trt-plugins", "core")
PRECISIONS = ("FP32", "FP16", "INT8")
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
        onnx_path = converter.convert(model, flavour, settings.onnx_precision(TrtFlavor.of(trt))).onnx_path
        row.layers, row.precisions = network_summary(trt, onnx_path, settings)
        row.parsed = True
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch:
            data = build_engine(trt, onnx_path, settings, timing_cache_path=Path(scratch) / "timing.cache")
        row.seconds = round(time.perf_counter() - start, 2)
        row.built, row.engine_mb = True, round(len(data) / 2**20, 2)
    except UserError as exc:
        row.reason = str(exc)
    return row


def skip_reason(flavour: str, precision: str) -> str | None:
    if flavour not in onnx_export.FLAVOURS:
        return f"flavour {flavour} is not in utils.onnx_export.FLAVOURS yet"
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
        print(f"skipped {INCEPTION}: {inception} has no frozen graph (run the tests once to build it)")
    return found


def print_table(rows: list[Row]) -> None:
    print(f"{'model':34} {'flavour':11} {'prec':4} {'batch':6} parsed built {'s':>6} {'MB':>6} layers  detail")
    for r in rows:
        detail = r.reason or ", ".join(f"{k} {v}" for k, v in sorted(r.precisions.items()))
        print(f"{r.model:34} {r.flavour:11} {r.precision:4} {r.batch:6} {str(r.parsed):6} {str(r.built):5} "
              f"{r.seconds if r.seconds is not None else '-':>6} {r.engine_mb if r.engine_mb is not None else '-':>6} "
              f"{r.layers if r.layers is not None else '-':>6}  {detail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-w", "--workspace", type=Path, default=Path(__file__).resolve().parents[1] / "workspace")
    parser.add_argument("--compute-capability", default="SM86", help="TensorRT-RTX build target")
    parser.add_argument("--json", type=Path, default=None, help="default: WORKSPACE/trt_build_check.json")
    args = parser.parse_args(argv)
    trt = import_trt()
    print(f"TensorRT module: {TrtFlavor.of(trt).label}")
    rows = []
    for model in models(args.workspace):
        for flavour in FLAVOURS:
            for precision in PRECISIONS:
                reason = skip_reason(flavour, precision)
                if reason:
                    print(f"skipped {model.name} {flavour} {precision}: {reason}")
                    continue
                rows += [check(trt, model, flavour, precision, b, args.compute_capability) for b in BATCHES]
    print_table(rows)
    out = args.json or args.workspace / "trt_build_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"trt": TrtFlavor.of(trt).label, "rows": [asdict(r) for r in rows]}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
