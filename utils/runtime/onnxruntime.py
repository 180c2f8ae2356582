"""ONNX Runtime runner: a converted ONNX file, on CUDA when available, else on the CPU.

``portable`` runs as is; ``trt-plugins`` runs with plugin/'s reference ops registered;
``core`` is followed by utils.postprocess.batched_multiclass_nms (numpy, or torch on the GPU).

Runs go through I/O binding with input and output buffers allocated once per batch size on the
session's device. On CUDA, ``cuda_graph=True`` captures a CUDA graph (ONNX Runtime's
enable_cuda_graph): batches are then padded to max_batch_size so that the shapes and addresses
never change. On CUDA, ``detect`` also takes a torch CUDA tensor (``--decode gpu``: DALI's or nvJPEG's
batch): its buffers are then torch tensors bound by address, the core flavour's NMS runs on the GPU and
only the detections come back, through pinned host buffers. ``detect`` is ``finish(launch(batch))``: on CUDA
utils.run.detect_batches runs finish (NMS, copies back) of batch k on a worker thread while launch runs the
engine on batch k + 1 (max_in_flight = RING; the engine's outputs wait in a ring of RING device slots).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from utils.artifact import BOXES, DETECTIONS, INPUT, NUM_DETECTIONS, SCORES, Artifact, flavour_info
from utils.postprocess import batched_multiclass_nms
from utils.runtime.base import Runner, RuntimeOptions

log = logging.getLogger(__name__)


def session_options(flavour: str) -> ort.SessionOptions:
    """Session options for a flavour (plugin/'s custom ops registered for the TensorRT plugin nodes)."""
    if flavour_info(flavour).plugin_ops:
        from plugin.ort_ops import session_options as plugin_session_options  # noqa: PLC0415

        options = plugin_session_options()
    else:
        options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def cuda_provider_options(cuda_graph: bool = False, prefer_nhwc: bool = False) -> dict[str, str]:
    return {"enable_cuda_graph": "1" if cuda_graph else "0", "prefer_nhwc": "1" if prefer_nhwc else "0",
            "cudnn_conv_algo_search": "EXHAUSTIVE", "do_copy_in_default_stream": "1"}


class HostBinding:
    """One batch size: device buffers for the input and every output, bound once."""

    def __init__(self, session: ort.InferenceSession, device: str, input_shape: list[int],
                 outputs: dict[str, tuple[list[int], type]]):
        self.session = session
        self.staging = np.zeros(input_shape, np.float32)
        self.input = ort.OrtValue.ortvalue_from_shape_and_type(input_shape, np.float32, device, 0)
        self.outputs = {name: ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, 0)
                        for name, (shape, dtype) in outputs.items()}
        self.binding = session.io_binding()
        self.binding.bind_ortvalue_input(INPUT, self.input)
        for name, value in self.outputs.items():
            self.binding.bind_ortvalue_output(name, value)

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Outputs for ``batch`` (at most the bound size; padded with zeros), as host arrays."""
        count = len(batch)
        self.staging[:count] = batch
        self.staging[count:] = 0
        self.input.update_inplace(self.staging)
        self.session.run_with_iobinding(self.binding)
        return [value.numpy()[:count] for value in self.outputs.values()]


RING = 2   # launched, unfinished device batches: the engine on batch k + 1 while batch k's NMS runs


@dataclass
class Launched:
    """A batch whose engine run is done: its outputs (host arrays, or CUDA tensors in one of the ring's
    slots, written on the launching stream before ``ready``)."""

    outputs: list
    owner: DeviceBinding | None = None    # the GPU binding whose ring slot holds the outputs
    slot: int = 0
    ready: object = None                  # torch.cuda.Event recorded after the copies into the slot


class DeviceBinding:
    """One batch size, input already on the GPU: torch-allocated buffers bound to the session by address.

    ``launch`` runs the engine and copies its outputs into one of RING slots (the bound outputs are fixed,
    e.g. by a CUDA graph, and rewritten by the next run); ``finish`` runs NMS and the copies back on its own
    non-blocking stream (never the legacy default stream, which would serialise with the launching thread's
    work), after the slot's copies, and frees the slot.
    """

    def __init__(self, session: ort.InferenceSession, input_shape: list[int],
                 outputs: dict[str, tuple[list[int], type]]):
        import torch  # noqa: PLC0415  (only with --decode gpu)

        self.torch, self.session = torch, session
        self.pinned: dict = {}
        self.input = torch.zeros(input_shape, dtype=torch.float32, device="cuda")
        self.outputs = {name: torch.empty(shape, dtype=torch.float32 if dtype == np.float32 else torch.int32,
                                          device="cuda") for name, (shape, dtype) in outputs.items()}
        device = self.input.device.index or 0
        self.binding = session.io_binding()
        self.binding.bind_input(INPUT, "cuda", device, np.float32, input_shape, self.input.data_ptr())
        for name, (shape, dtype) in outputs.items():
            self.binding.bind_output(name, "cuda", device, dtype, shape, self.outputs[name].data_ptr())
        self.ring = [None] * RING           # slots made on first use
        self.busy = [False] * RING
        self.launches = 0
        self.stream = torch.cuda.Stream(self.input.device)     # finish: a pool stream, non-blocking
        self.launch_stream = torch.cuda.Stream(self.input.device)   # launch: the input and ring copies

    def run(self, batch) -> list:
        """Outputs for the CUDA tensor ``batch`` (padded with zeros), as CUDA tensors (views, valid
        until the next run)."""
        count = len(batch)
        with self.torch.cuda.stream(self.launch_stream):
            # after whatever the caller queued on its current stream (a batch made there); the DALI loader hands
            # out batches already complete on a stream of its own, so nothing of its next batch is waited for
            self.launch_stream.wait_stream(self.torch.cuda.default_stream(self.input.device))
            self.input[:count].copy_(batch)
            if count < len(self.input):
                self.input[count:].zero_()
        self.launch_stream.synchronize()                    # ONNX Runtime runs on its own stream
        self.session.run_with_iobinding(self.binding)       # returns once its outputs are written
        return [value[:count] for value in self.outputs.values()]

    def launch(self, batch) -> Launched:
        """Run the engine on ``batch`` and copy its outputs into the next ring slot (on this thread's stream)."""
        outputs = self.run(batch)
        slot = self.launches % RING
        if self.busy[slot]:
            raise RuntimeError(f"more than {RING} batches launched and not finished")
        if self.ring[slot] is None:
            self.ring[slot] = [self.torch.empty_like(value) for value in self.outputs.values()]
        self.busy[slot], self.launches = True, self.launches + 1
        with self.torch.cuda.stream(self.launch_stream):
            kept = [ring[:len(value)].copy_(value) for ring, value in zip(self.ring[slot], outputs)]
            ready = self.torch.cuda.Event()
            ready.record(self.launch_stream)
        return Launched(kept, self, slot, ready)

    def finish(self, launched: Launched, nms) -> list[np.ndarray]:
        """NMS (when ``nms``, an NmsSpec) and the copies back of a launched batch, on this binding's stream."""
        try:
            with self.torch.cuda.stream(self.stream):
                self.stream.wait_event(launched.ready)
                outputs = launched.outputs
                if nms is not None:
                    outputs = batched_multiclass_nms(*outputs, nms)
                return self.to_host(outputs)
        finally:
            self.stream.synchronize()       # nothing reads the slot any more (also after an error)
            self.busy[launched.slot] = False

    def to_host(self, values) -> list[np.ndarray]:
        """CUDA tensors (the detections) -> numpy copies, through pinned buffers kept per shape: one
        non-blocking copy each, then one wait on the stream."""
        staged = []
        for value in values:
            key = (tuple(value.shape), value.dtype)
            if key not in self.pinned:
                self.pinned[key] = self.torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            self.pinned[key].copy_(value, non_blocking=True)
            staged.append(self.pinned[key])
        self.torch.cuda.current_stream().synchronize()
        return [value.numpy().copy() for value in staged]


def _session(artifact: Artifact, on_cuda: bool, cuda_graph: bool, nhwc: bool) -> ort.InferenceSession:
    """An InferenceSession on the artifact's file (CUDA provider first when ``on_cuda``)."""
    providers = ([("CUDAExecutionProvider", cuda_provider_options(cuda_graph, nhwc))] if on_cuda else []
                 ) + ["CPUExecutionProvider"]
    options = session_options(artifact.flavour)
    if flavour_info(artifact.flavour).plugin_ops:
        from plugin.ort_ops import inference_session  # noqa: PLC0415  (list fields as ORT can read them)

        return inference_session(str(artifact.path), providers, options)
    return ort.InferenceSession(str(artifact.path), options, providers=providers)


def cuda_available() -> bool:
    """ONNX Runtime here has its CUDA provider (onnxruntime-gpu)."""
    return "CUDAExecutionProvider" in ort.get_available_providers()


class OnnxRuntimeRunner(Runner):
    name = "ONNX Runtime"

    def __init__(self, artifact: Artifact, max_batch_size: int, options: RuntimeOptions = RuntimeOptions()):
        """A session on ``artifact``'s ONNX file (CUDA when ONNX Runtime has it and ``options.use_cuda``)."""
        on_cuda = options.use_cuda and cuda_available()
        cuda_graph = options.cuda_graph and on_cuda
        try:
            self.session = _session(artifact, on_cuda, cuda_graph, options.nhwc)
        except Exception as exc:  # noqa: BLE001  (ONNX Runtime raises its own Fail / RuntimeException)
            if not cuda_graph:
                raise
            # ONNX Runtime captures a graph only when every node runs on CUDA (e.g. --nhwc can leave some on the CPU)
            log.warning("ONNX Runtime cannot capture a CUDA graph of %s (%s); running without --cuda-graph",
                        artifact.path.name, " ".join(str(exc).split())[:160])
            cuda_graph = False
            self.session = _session(artifact, on_cuda, cuda_graph, options.nhwc)
        device = "CUDA" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "CPU"
        super().__init__(artifact, max_batch_size, device)
        self.flavour = artifact.flavour
        self.cuda_graph = cuda_graph and device == "CUDA"
        self.bindings: dict = {}

    def _outputs(self, count: int) -> dict[str, tuple[list[int], type]]:
        anchors, classes = self.spec.num_anchors, self.spec.num_classes
        if not flavour_info(self.flavour).nms_inside:
            return {BOXES: ([count, anchors, 4], np.float32), SCORES: ([count, anchors, classes], np.float32)}
        return {DETECTIONS: ([count, self.spec.max_detections, 7], np.float32), NUM_DETECTIONS: ([count], np.int32)}

    def binding(self, count: int, on_device: bool = False):
        """The binding for a batch of ``count`` (host or GPU input), made on first use.

        With a CUDA graph there is one binding per session: the graph keeps its buffers' addresses.
        """
        size = self.max_batch_size if self.cuda_graph else count
        key = (on_device, size)
        if key not in self.bindings:
            if self.cuda_graph and self.bindings:
                raise RuntimeError("this session captured its CUDA graph on other buffers; open another runner")
            width, height = self.spec.input_size
            shape, outputs = [size, 3, height, width], self._outputs(size)
            self.bindings[key] = (DeviceBinding(self.session, shape, outputs) if on_device
                                 else HostBinding(self.session, self.device.lower(), shape, outputs))
        return self.bindings[key]

    def bound_run(self, count: int):
        """The engine alone, for benchmarks: a no-argument callable that runs the graph on the bound buffers
        of a batch of ``count`` (input already on the device, outputs left there)."""
        binding = self.binding(count).binding
        return lambda: self.session.run_with_iobinding(binding)

    def run_network(self, batch: np.ndarray) -> list[np.ndarray]:
        """The ONNX graph's outputs for one batch (the engine alone, for benchmarks)."""
        return self.binding(len(batch), on_device=False).run(batch)

    @property
    def takes_device_input(self) -> bool:
        return self.device == "CUDA"

    def run_network_on_device(self, batch) -> list:
        """The graph's outputs, as CUDA tensors, for a batch that is a CUDA torch tensor."""
        return self.binding(len(batch), on_device=True).run(batch)

    @property
    def max_in_flight(self) -> int:
        """On CUDA, RING: the engine runs batch k + 1 while batch k's NMS and copies back run on another
        thread (utils.run.detect_batches); on the CPU one batch at a time (both would share the same cores)."""
        return RING if self.device == "CUDA" else 1

    def launch(self, batch) -> Launched:
        """The engine on one batch (numpy, or a CUDA torch tensor): its outputs kept apart from the bound
        buffers, which the next run rewrites (a ring slot on the GPU; a host copy)."""
        if not isinstance(batch, np.ndarray):
            return self.binding(len(batch), on_device=True).launch(batch)
        outputs = self.run_network(batch)          # CUDA: copied to the host; CPU: views of the bound outputs
        return Launched(outputs if self.device == "CUDA" else [np.array(value) for value in outputs])

    def finish(self, launched: Launched) -> tuple[np.ndarray, np.ndarray]:
        """NMS (core flavour) and the detections on the host, for a launched batch."""
        nms = None if flavour_info(self.flavour).nms_inside else self.spec.nms
        if launched.owner is not None:
            detections, num_detections = launched.owner.finish(launched, nms)
            return detections, num_detections
        outputs = launched.outputs if nms is None else batched_multiclass_nms(*launched.outputs, nms)
        detections, num_detections = outputs
        return detections, num_detections

    def detect(self, batch) -> tuple[np.ndarray, np.ndarray]:
        return self.finish(self.launch(batch))

    def settings(self) -> list[str]:
        return super().settings() + (["  * CUDA graph - on"] if self.cuda_graph else [])

    def close(self) -> None:
        self.bindings.clear()
