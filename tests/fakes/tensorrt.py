"""A recording stand-in for the `tensorrt` Python module (TensorRT 10 or 11 shaped).

Everything `export.tensorrt_build` and `export.plan_executor` call exists here with the
TensorRT 10/11 Python API's names and is recorded in `FakeTensorRT.calls`, so tests can
assert what the builder was told (flags per precision, workspace bytes, optimisation
level, one profile per bucket with min/opt/max on the dynamic inputs only) and in which
order the runner drives an execution context. A "plan" is the ONNX graph the parser read
plus what the builder was configured with; its execution context runs that graph in ONNX
Runtime, reading and writing the tensors at the addresses it was given, and refuses input
shapes outside the selected profile as TensorRT does.

The TensorRT 11 shape has no weak-typing flags (`BuilderFlag.FP16` and friends are gone:
touching one raises AttributeError, as the real 11.x bindings do).
"""

from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import json
import struct
import types
from pathlib import Path

import numpy as np

MAGIC = b"FAKEPLAN"


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    INT64 = 8


_NUMPY = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT32: np.int32,
          DataType.INT64: np.int64, DataType.BOOL: np.bool_, DataType.INT8: np.int8}
_FROM_ONNX = {1: DataType.FLOAT, 10: DataType.HALF, 6: DataType.INT32, 7: DataType.INT64,
              9: DataType.BOOL}


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1


class BuilderFlag10(enum.IntEnum):
    FP16 = 0
    INT8 = 1
    TF32 = 7
    OBEY_PRECISION_CONSTRAINTS = 8
    STRONGLY_TYPED_ONLY_FOR_TESTS = 99


class BuilderFlag11(enum.IntEnum):
    """TensorRT 11: the precision (weak-typing) flags are removed."""

    TF32 = 7


class Logger:
    VERBOSE, INFO, WARNING, ERROR = 4, 3, 2, 1

    def __init__(self, level=2):
        self.level = level


class _Tensor:
    def __init__(self, name: str, shape: tuple[int, ...], dtype: DataType):
        self.name, self.shape, self.dtype = name, shape, dtype


class Network:
    def __init__(self, trt: FakeTensorRT, flags: int):
        self.trt, self.flags = trt, flags
        self.inputs: list[_Tensor] = []
        self.outputs: list[_Tensor] = []
        self.onnx_path: Path | None = None

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> _Tensor:
        return self.inputs[i]


class OnnxParser:
    def __init__(self, network: Network, logger):
        self.network, self.errors = network, []

    def parse_from_file(self, path: str) -> bool:
        import onnx

        trt = self.network.trt
        trt.record("parse_from_file", path)
        if trt.parse_errors:
            self.errors = list(trt.parse_errors)
            return False
        try:
            model = onnx.load(path)  # external weights from the graph's folder, as TensorRT
        except Exception as e:  # an unreadable file is a parse error, not an exception
            self.errors = [f"ModelImporter.cpp:1: failed to load {path}:\n{e}"]
            return False
        inits = {t.name for t in model.graph.initializer}

        def tensor(v) -> _Tensor:
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1
                         for d in v.type.tensor_type.shape.dim)
            return _Tensor(v.name, dims, _FROM_ONNX[v.type.tensor_type.elem_type])

        self.network.inputs = [tensor(v) for v in model.graph.input if v.name not in inits]
        self.network.outputs = [tensor(v) for v in model.graph.output]
        self.network.onnx_path = Path(path)
        trt.parsed_models.append(model)
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> str:
        return self.errors[i]


class OptimizationProfile:
    def __init__(self, trt: FakeTensorRT):
        self.trt, self.shapes = trt, {}

    def set_shape(self, name, lo, opt, hi):
        self.trt.record("profile.set_shape", name, tuple(lo), tuple(opt), tuple(hi))
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class BuilderConfig:
    def __init__(self, trt: FakeTensorRT):
        self.trt = trt
        self.flags: set = {trt.BuilderFlag.TF32}  # TensorRT's default: TF32 allowed
        self.pool_limits: dict = {}
        self.profiles: list[OptimizationProfile] = []
        self._opt_level = 3

    def set_flag(self, flag):
        self.trt.record("config.set_flag", flag.name)
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.trt.record("config.clear_flag", flag.name)
        self.flags.discard(flag)

    def set_memory_pool_limit(self, pool, size):
        if not isinstance(size, int):  # the bindings take an integer byte count
            raise TypeError("set_memory_pool_limit(): incompatible function arguments")
        self.trt.record("config.set_memory_pool_limit", pool.name, size)
        self.pool_limits[pool] = size

    @property
    def builder_optimization_level(self):
        return self._opt_level

    @builder_optimization_level.setter
    def builder_optimization_level(self, level):
        self.trt.record("config.builder_optimization_level", level)
        self._opt_level = level

    def add_optimization_profile(self, profile) -> int:
        self.trt.record("config.add_optimization_profile", len(self.profiles))
        self.profiles.append(profile)
        return len(self.profiles) - 1


class Builder:
    def __init__(self, trt: FakeTensorRT, logger):
        self.trt = trt

    def create_network(self, flags: int = 0) -> Network:
        self.trt.record("create_network", flags)
        return Network(self.trt, flags)

    def create_builder_config(self) -> BuilderConfig:
        self.trt.configs.append(BuilderConfig(self.trt))
        return self.trt.configs[-1]

    def create_optimization_profile(self) -> OptimizationProfile:
        return OptimizationProfile(self.trt)

    def build_serialized_network(self, network: Network, config: BuilderConfig):
        self.trt.record("build_serialized_network")
        if self.trt.fail_build:
            return None
        header = {
            "inputs": [[t.name, list(t.shape), int(t.dtype)] for t in network.inputs],
            "outputs": [[t.name, list(t.shape), int(t.dtype)] for t in network.outputs],
            "profiles": [{n: [list(s) for s in v] for n, v in p.shapes.items()}
                         for p in config.profiles],
            "flags": sorted(f.name for f in config.flags),
            "network_flags": network.flags,
        }
        head = json.dumps(header).encode()
        return MAGIC + struct.pack("<I", len(head)) + head + network.onnx_path.read_bytes()


def read_plan(blob: bytes) -> tuple[dict, bytes]:
    assert blob[:len(MAGIC)] == MAGIC, "not a fake plan"
    (n,) = struct.unpack("<I", blob[len(MAGIC):len(MAGIC) + 4])
    start = len(MAGIC) + 4
    return json.loads(blob[start:start + n]), blob[start + n:]


class Engine:
    def __init__(self, trt: FakeTensorRT, blob: bytes):
        self.trt = trt
        self.header, model = read_plan(blob)
        import onnxruntime as ort

        self.session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        self.io = [(n, tuple(s), DataType(d), TensorIOMode.INPUT)
                   for n, s, d in self.header["inputs"]]
        self.io += [(n, tuple(s), DataType(d), TensorIOMode.OUTPUT)
                    for n, s, d in self.header["outputs"]]

    @property
    def num_io_tensors(self) -> int:
        return len(self.io)

    @property
    def num_optimization_profiles(self) -> int:
        return max(1, len(self.header["profiles"]))

    def get_tensor_name(self, i: int) -> str:
        return self.io[i][0]

    def _entry(self, name):
        return next(e for e in self.io if e[0] == name)

    def get_tensor_mode(self, name) -> TensorIOMode:
        return self._entry(name)[3]

    def get_tensor_dtype(self, name) -> DataType:
        return self._entry(name)[2]

    def get_tensor_profile_shape(self, name, profile):
        profiles = self.header["profiles"]
        if profiles and name in profiles[profile]:
            return [tuple(s) for s in profiles[profile][name]]
        return [self._entry(name)[1]] * 3

    def create_execution_context(self) -> Context:
        return Context(self)


class Context:
    """Checks the order TensorRT requires and runs the graph on the addressed memory."""

    def __init__(self, engine: Engine):
        self.engine, self.trt = engine, engine.trt
        self.profile = 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.trt.record("context.set_optimization_profile_async", index, stream)
        if not 0 <= index < self.engine.num_optimization_profiles:
            return False
        self.profile, self.shapes = index, {}  # shapes must be set again after a switch
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        self.trt.record("context.set_input_shape", name, tuple(shape))
        lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
        ok = len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi,
                                                                           strict=True))
        if ok:
            self.shapes[name] = tuple(shape)
        return ok

    def _inputs_set(self) -> bool:
        return all(n in self.shapes for n, *_, mode in self.engine.io
                   if mode == TensorIOMode.INPUT)

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        self.trt.record("context.get_tensor_shape", name)
        entry = self.engine._entry(name)
        if entry[3] == TensorIOMode.INPUT:
            return self.shapes.get(name, entry[1])
        if not self._inputs_set():
            return tuple(-1 for _ in entry[1])
        return self._run({n: np.zeros(s, _NUMPY[self.engine.get_tensor_dtype(n)])
                          for n, s in self.shapes.items()})[name].shape

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.trt.record("context.set_tensor_address", name)
        self.addresses[name] = address
        return True

    def _run(self, feed: dict) -> dict:
        names = [o.name for o in self.engine.session.get_outputs()]
        return dict(zip(names, self.engine.session.run(names, feed), strict=True))

    def _view(self, name: str, shape) -> np.ndarray:
        dtype = np.dtype(_NUMPY[self.engine.get_tensor_dtype(name)])
        size = int(np.prod(shape)) * dtype.itemsize
        raw = (ctypes.c_char * size).from_address(self.addresses[name])
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    def execute_async_v3(self, stream: int) -> bool:
        self.trt.record("context.execute_async_v3", stream)
        io = self.engine.io
        if not self._inputs_set() or any(n not in self.addresses for n, *_ in io):
            return False
        feed = {n: self._view(n, self.shapes[n]).copy() for n, *_, mode in io
                if mode == TensorIOMode.INPUT}
        for name, value in self._run(feed).items():
            # a plan that drifts from its graph on one profile (tests of verification)
            value = value + self.trt.drift.get((name, self.profile), 0.0)
            self._view(name, value.shape)[...] = value
        return True


class Runtime:
    def __init__(self, trt: FakeTensorRT, logger):
        self.trt = trt

    def deserialize_cuda_engine(self, blob: bytes):
        self.trt.record("deserialize_cuda_engine")
        return Engine(self.trt, bytes(blob))


class FakeTensorRT(types.ModuleType):
    """``import tensorrt`` for a test: ``monkeypatch.setitem(sys.modules, "tensorrt", fake)``
    (a module object with a spec: torch's import-time module scan looks at it)."""

    Logger = Logger
    TensorIOMode = TensorIOMode
    MemoryPoolType = MemoryPoolType
    NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
    DataType = DataType

    def __init__(self, version: str = "10.9.0.34"):
        super().__init__("tensorrt")
        self.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
        self.__version__ = version
        self.BuilderFlag = BuilderFlag10 if int(version.split(".")[0]) < 11 else BuilderFlag11
        self.calls: list[tuple] = []
        self.configs: list[BuilderConfig] = []
        self.parsed_models: list = []
        self.parse_errors: list[str] = []
        self.fail_build = False
        self.drift: dict[tuple[str, int], float] = {}  # (output, profile) -> added value

    def record(self, *call) -> None:
        self.calls.append(call)

    def named(self, prefix: str) -> list[tuple]:
        return [c for c in self.calls if c[0].startswith(prefix)]

    def Builder(self, logger):  # TensorRT's class names, made by the module
        return Builder(self, logger)

    def OnnxParser(self, network, logger):
        return OnnxParser(network, logger)

    def Runtime(self, logger):
        return Runtime(self, logger)

    @staticmethod
    def nptype(dtype: DataType):
        return _NUMPY[DataType(dtype)]


class HostBuffers:
    """`plan_executor.DeviceBuffers` in host memory: what the fake context reads and writes."""

    stream_handle = 0xC0FFEE

    def __init__(self):
        self.synchronized = 0

    def upload(self, array):
        buf = np.array(array, copy=True, order="C")
        return buf, buf.ctypes.data

    def empty(self, shape, dtype):
        buf = np.zeros(shape, dtype)
        return buf, buf.ctypes.data

    def download(self, buffer):
        assert self.synchronized, "read before the stream was synchronised"
        return np.asarray(buffer, np.float32)

    def synchronize(self):
        self.synchronized += 1

    def release(self):
        pass
