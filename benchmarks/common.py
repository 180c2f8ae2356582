"""What several benchmark scripts share: the plan of a run, the engine-alone timing, the machine's name.

Scripts open their model as users do: ``resolve_plan`` is ``utils.plan.Plan.resolve`` from the
scripts' -m / --onnx / --engine (utils.cli.add_source_args) and runtime options, then
``plan.prepare()`` and ``plan.open(artifact)`` / ``utils.run.open_executor``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np

from utils.files import write_text_atomic


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """-p / --flavour (for -m: what to convert; a file's own otherwise) and the ONNX Runtime CUDA options."""
    from utils import cli  # noqa: PLC0415

    cli.add_precision_arg(parser, "precision to convert -m MODEL to (default: FP32, or the given file's)", default=None)
    cli.add_flavour_arg(parser)
    group = parser.add_argument_group("runtime options")
    group.add_argument("--cuda-graph", action="store_true",
                       help="ONNX Runtime on CUDA: capture a CUDA graph (batches padded to the batch size)")
    group.add_argument("--nhwc", action="store_true", help="ONNX Runtime on CUDA: prefer NHWC convolutions")


def resolve_plan(args: argparse.Namespace, backend: str, batch_size: int, decode: str = "cpu", **overrides):
    """``Plan.resolve`` of a benchmark's arguments (utils.cli.add_source_args, add_runtime_args) for one
    backend, batch size and decode path; ``overrides`` replace any other keyword of Plan.resolve."""
    from utils.plan import Plan  # noqa: PLC0415

    options = dict(model=args.model, onnx=args.onnx, engine=args.engine, workspace=args.workspace, backend=backend,
                   flavour=getattr(args, "flavour", "auto"), precision=getattr(args, "precision", None),
                   batch_size=batch_size, decode=decode, cuda_graph=getattr(args, "cuda_graph", False),
                   nhwc=getattr(args, "nhwc", False))
    return Plan.resolve(**{**options, **overrides})


def comma_choices(allowed, convert=str):
    """An argparse type: comma-separated values, each one of ``allowed`` ("cpu,gpu" -> ["cpu", "gpu"])."""
    def parse(text: str) -> list:
        try:
            values = [convert(value) for value in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"cannot read '{text}'") from None
        unknown = [str(value) for value in values if value not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(map(str, allowed))}")
        return values
    return parse


def parse_batches(text: str) -> list[int]:
    """"1,8,32" -> [1, 8, 32] (argparse type)."""
    try:
        batches = [int(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes, got '{text}'") from None
    if not batches or min(batches) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be at least 1, got '{text}'")
    return batches


def measure(runner, batch: int, seconds: float, warmup: int) -> list[float]:
    """Per-run times (s) of an ONNX Runtime runner's bound run alone (input already on the device, outputs
    left there), after ``warmup`` runs; at least 20 runs, for at least ``seconds``."""
    if not hasattr(runner, "bound_run"):
        raise TypeError(f"the engine-alone timing needs the ONNX Runtime runner, not {runner.name}")
    rng = np.random.default_rng(0)
    width, height = runner.spec.input_size
    runner.run_network(rng.uniform(-1, 1, (batch, 3, height, width)).astype(np.float32))  # binds, fills the input
    run = runner.bound_run(batch)
    for _ in range(warmup):
        run()
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 20:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def gpu_name() -> str:
    """The GPU's name (cuda-python, else nvidia-smi), or "no GPU"."""
    from utils.trt import gpu_name as cuda_gpu_name  # noqa: PLC0415

    name = cuda_gpu_name()
    if name:
        return name
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "no GPU"


def write_json(path: Path, report: dict) -> None:
    """The report as indented JSON, written atomically."""
    write_text_atomic(path, json.dumps(report, indent=1))
