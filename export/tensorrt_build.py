"""TensorRT engine: parse the ONNX file, build with one optimisation profile, save plan and timing cache,
run and time the engine. Needs the ``tensorrt`` package and a CUDA GPU (``missing_requirements``).

Precision follows TensorRT 10/11: the network is created strongly typed where the version has the
flag (the dtypes of the graph decide, which is why low-precision graphs are cast before export and
keep the router/TopK in float32); only versions without strong typing get the FP16/BF16 builder flag.
TF32 is switched off for fp32 engines (TensorRT enables it by default; tf32 dots miss the fp32
tolerance of 1e-5 that the engine is validated against).

Latency is measured on device buffers: inputs are copied to the GPU and outputs allocated once,
then only ``execute_async_v3`` is timed, with CUDA events (median of ``TIMING_RUNS``).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

WORKSPACE_BYTES = 2 << 30
TIMING_RUNS = 20


class TensorRTUnavailable(RuntimeError):
    """tensorrt or a CUDA GPU is missing; the message names what."""


class TensorRTBuildError(RuntimeError):
    """The parser or the builder rejected the graph."""


def missing_requirements() -> list[str]:
    """What the engine build lacks here (empty when it can run)."""
    missing = []
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        missing.append("the tensorrt Python package (pip install 'mosear-fast[tensorrt]')")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    return missing


def require_tensorrt() -> None:
    missing = missing_requirements()
    if missing:
        raise TensorRTUnavailable("--format tensorrt: needs " + " and ".join(missing))


def builder_flags_to_clear(dtype: str, *, available) -> list[str]:
    """TensorRT builder flags to switch off for an engine of ``dtype``: TF32 for fp32 engines."""
    return ["TF32"] if dtype == "fp32" and "TF32" in available else []


def build_engine(onnx_path: Path, plan_path: Path, cache_path: Path, profile: dict, *, dtype: str,
                 previous_cache: Path | None = None) -> dict:
    """Builds and serialises the engine; returns build facts (version, seconds, typing, cache reuse)."""
    import tensorrt as trt

    require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves model.onnx.data relative to the file
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    for flag in builder_flags_to_clear(dtype, available=dir(trt.BuilderFlag)):
        config.clear_flag(getattr(trt.BuilderFlag, flag))
    if not strongly_typed:
        flag = {"fp16": "FP16", "bf16": "BF16"}.get(dtype)
        if flag is not None and hasattr(trt.BuilderFlag, flag):
            config.set_flag(getattr(trt.BuilderFlag, flag))
    optimisation = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.items():
        optimisation.set_shape(name, low, opt, high)
    config.add_optimization_profile(optimisation)
    reused = previous_cache is not None and previous_cache.is_file()
    cache = config.create_timing_cache(previous_cache.read_bytes() if reused else b"")
    config.set_timing_cache(cache, ignore_mismatch=True)  # a cache of another device/version is rebuilt
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise TensorRTBuildError("TensorRT's builder returned no engine (see the TensorRT log above)")
    plan_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"tensorrt_version": trt.__version__, "strongly_typed": strongly_typed, "build_seconds": seconds,
            "tf32": "off" if "TF32" in builder_flags_to_clear(dtype, available=dir(trt.BuilderFlag)) else "allowed",
            "timing_cache_reused": reused, "profile": {k: [list(s) for s in v] for k, v in profile.items()}}


class EngineRunner:
    """Runs a serialised engine on CUDA tensors (TensorRT 10+ named-tensor API)."""

    def __init__(self, plan_path: Path):
        import tensorrt as trt

        self.trt = trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def _torch_dtype(self, name):
        return {self.trt.float32: torch.float32, self.trt.float16: torch.float16, self.trt.bfloat16: torch.bfloat16,
                self.trt.int32: torch.int32, self.trt.int64: torch.int64, self.trt.bool: torch.bool}[
            self.engine.get_tensor_dtype(name)]

    def bind(self, feeds: dict) -> dict:
        """Device tensors for every input (copied once) and output (allocated), bound to the context."""
        buffers = {}
        for name in self.inputs:
            tensor = feeds[name].to("cuda", self._torch_dtype(name)).contiguous()
            buffers[name] = tensor
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            buffers[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
            self.context.set_tensor_address(name, buffers[name].data_ptr())
        return buffers

    def execute(self, stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise TensorRTBuildError("TensorRT engine execution failed")

    def __call__(self, feeds: dict) -> dict:
        buffers = self.bind(feeds)
        stream = torch.cuda.current_stream()
        self.execute(stream)
        stream.synchronize()
        return {name: buffers[name].cpu() for name in self.outputs}

    def median_ms(self, feeds: dict) -> float:
        """Median engine time (ms) on device-resident buffers: no host-device copy in the timed region."""
        buffers = self.bind(feeds)  # noqa: F841  (kept alive while the engine reads and writes them)
        stream = torch.cuda.current_stream()
        self.execute(stream)  # warm-up
        times = []
        for _ in range(TIMING_RUNS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            self.execute(stream)
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
