"""A stand-in for TensorRT's compiled Python module (``tensorrt``), just enough for NVIDIA's own pure-Python
``tensorrt.plugin`` package (the ``plugin/*.py`` of the ``tensorrt-cu12-bindings`` wheel) to import, to
register our plugins through its real validation, and for a test to drive each plugin the way TensorRT's
builder does: create_plugin -> output types -> output shapes -> format combinations -> launch parameters
-> kernel.

What it stands in for, and how it behaves, follows TensorRT 10.14's Python API (NvInferRuntime.h and the
bindings' documentation): enum values, the plugin registry keyed by (name, version, namespace), and
``IExprBuilder`` folding operations on constants. A dimension that is not constant is symbolic: its
expression is kept as text and asking its truth value raises, as TensorRT 10.16's ``tensorrt.plugin`` does,
so a plugin that branches on a symbolic shape fails here too.
"""

from __future__ import annotations

import enum

import numpy as np

__version__ = "10.14.1.48"


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10


float32, float16, int8, int32, bool = DataType.FLOAT, DataType.HALF, DataType.INT8, DataType.INT32, DataType.BOOL
uint8, bfloat16, int64 = DataType.UINT8, DataType.BF16, DataType.INT64

_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
       DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT64: np.int64}


def nptype(dtype: DataType):
    return _NP[dtype]


class TensorFormat(enum.IntEnum):
    LINEAR = 0
    CHW2 = 1
    HWC8 = 2
    CHW4 = 3
    CHW16 = 4
    CHW32 = 5
    DHWC8 = 6
    CDHW32 = 7
    HWC = 8
    DLA_LINEAR = 9
    DLA_HWC4 = 10
    HWC16 = 11
    DHWC = 12


class PluginFieldType(enum.IntEnum):
    FLOAT16 = 0
    FLOAT32 = 1
    FLOAT64 = 2
    INT8 = 3
    INT16 = 4
    INT32 = 5
    CHAR = 6
    DIMS = 7
    UNKNOWN = 8
    BF16 = 9
    INT64 = 10
    FP8 = 11
    INT4 = 12
    FP4 = 13


class PluginField:
    def __init__(self, name: str = "", data=None, type: PluginFieldType = PluginFieldType.UNKNOWN) -> None:
        self.name, self.data, self.type = name, data, type


class PluginFieldCollection(list):
    pass


class DimensionOperation(enum.IntEnum):
    SUM = 0
    PROD = 1
    MAX = 2
    MIN = 3
    SUB = 4
    EQUAL = 5
    LESS = 6
    FLOOR_DIV = 7
    CEIL_DIV = 8


_FOLD = {
    DimensionOperation.SUM: lambda a, b: a + b, DimensionOperation.PROD: lambda a, b: a * b,
    DimensionOperation.MAX: max, DimensionOperation.MIN: min, DimensionOperation.SUB: lambda a, b: a - b,
    DimensionOperation.EQUAL: lambda a, b: int(a == b), DimensionOperation.LESS: lambda a, b: int(a < b),
    DimensionOperation.FLOOR_DIV: lambda a, b: a // b, DimensionOperation.CEIL_DIV: lambda a, b: -(-a // b),
}
_SYMBOL = {DimensionOperation.SUM: "+", DimensionOperation.PROD: "*", DimensionOperation.SUB: "-",
           DimensionOperation.FLOOR_DIV: "//", DimensionOperation.CEIL_DIV: "cdiv", DimensionOperation.MAX: "max",
           DimensionOperation.MIN: "min", DimensionOperation.EQUAL: "==", DimensionOperation.LESS: "<"}


class IDimensionExpr:
    """A constant, or a symbolic dimension (``text`` names it)."""

    def __init__(self, value: int | None = None, text: str | None = None) -> None:
        self.value, self.text = value, text if value is None else str(value)

    def is_constant(self) -> bool:
        return self.value is not None

    def get_constant_value(self) -> int:
        if self.value is None:
            raise ValueError(f"{self.text} is not a constant")
        return self.value

    def is_size_tensor(self) -> bool:
        return False

    def __bool__(self) -> bool:
        raise TypeError(f"the truth value of the symbolic dimension {self.text} is unknown at build time")

    def __repr__(self) -> str:
        return f"IDimensionExpr({self.text})"


class IExprBuilder:
    """Folds operations on constants, as TensorRT's expression builder does; symbolic otherwise."""

    def __init__(self) -> None:
        self.operations = 0

    def constant(self, value: int) -> IDimensionExpr:
        return IDimensionExpr(int(value))

    def operation(self, op: DimensionOperation, a: IDimensionExpr, b: IDimensionExpr) -> IDimensionExpr:
        self.operations += 1
        if a.is_constant() and b.is_constant():
            return IDimensionExpr(_FOLD[op](a.value, b.value))
        return IDimensionExpr(None, f"({a.text} {_SYMBOL[op]} {b.text})")


class DimsExprs(list):
    def __init__(self, n: int = 0) -> None:
        super().__init__([None] * n)


class Dims(tuple):
    MAX_DIMS = 8

    def __new__(cls, shape=()):
        return super().__new__(cls, [0] * shape if isinstance(shape, int) else shape)


class PluginTensorDesc:
    def __init__(self, dims=(), type: DataType = DataType.FLOAT, format: TensorFormat = TensorFormat.LINEAR,
                 scale: float = 1.0) -> None:
        self.dims, self.type, self.format, self.scale = Dims(dims), type, format, scale


class DynamicPluginTensorDesc:
    def __init__(self, desc: PluginTensorDesc | None = None) -> None:
        self.desc = desc or PluginTensorDesc()
        self.min = self.max = self.opt = self.desc.dims


class _Interface:
    def __init__(self, *args, **kwargs) -> None:
        pass


class IPluginV3(_Interface):
    pass


class IPluginV3QuickCore(_Interface):
    pass


class IPluginV3QuickBuild(_Interface):
    pass


class IPluginV3QuickRuntime(_Interface):
    pass


class IPluginV3QuickAOTBuild(_Interface):
    pass


class IPluginCreatorV3Quick(_Interface):
    pass


class IPluginResourceContext(_Interface):
    pass


class ISymExpr(_Interface):
    pass


class ITensor(_Interface):
    pass


class PluginArgType(enum.IntEnum):
    INT = 0


class PluginArgDataType(enum.IntEnum):
    INT8 = 0
    INT16 = 1
    INT32 = 2


class QuickPluginCreationRequest(enum.IntEnum):
    UNKNOWN = 0
    PREFER_JIT = 1
    PREFER_AOT = 2
    STRICT_JIT = 3
    STRICT_AOT = 4


class TensorRTPhase(enum.IntEnum):
    BUILD = 0
    RUNTIME = 1


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, min_severity: int = 2) -> None:
        self.min_severity = min_severity

    def log(self, severity: int, msg: str) -> None:
        pass


class _PluginRegistry:
    """TensorRT's registry: one creator per (name, version, namespace); a second registration fails."""

    def __init__(self) -> None:
        self.creators: dict[tuple[str, str, str], object] = {}

    def register_creator(self, creator, namespace: str) -> bool:
        key = (creator.name, getattr(creator, "plugin_version", "1"), namespace)
        if key in self.creators:
            return False
        self.creators[key] = creator
        return True

    def get_creator(self, name: str, version: str, namespace: str = ""):
        return self.creators.get((name, version, namespace))


_registry = _PluginRegistry()


def get_plugin_registry() -> _PluginRegistry:
    return _registry

