"""ONNX op tables and attribute readers shared by the receptive-field rules."""

from __future__ import annotations

import onnx
from onnx import helper


class Unsupported(Exception):
    """Raised inside an op rule: the node goes to ``unknown_nodes``."""


ELEMENTWISE = frozenset(
    """Abs Acos Acosh Add And Asin Asinh Atan Atanh BatchNormalization BitShift BitwiseAnd
    BitwiseNot BitwiseOr BitwiseXor Cast CastLike Ceil Celu Clip Cos Cosh DequantizeLinear Div
    Dropout Elu Equal Erf Exp Expand Floor Gelu Greater GreaterOrEqual HardSigmoid HardSwish
    Identity IsInf IsNaN LRN LeakyRelu Less LessOrEqual Log Max Mean Min Mish Mod Mul Neg Not
    Or PRelu Pow QuantizeLinear Reciprocal Relu Round Selu Shrink Sigmoid Sign Sin Sinh
    Softplus Softsign Sqrt Sub Sum Tan Tanh ThresholdedRelu Where Xor
    FastGelu BiasGelu QuickGelu BiasAdd QLinearAdd QLinearMul QLinearSigmoid QLinearLeakyRelu
    ReorderInput ReorderOutput""".split()
)
CONVS = frozenset({"Conv", "ConvInteger", "QLinearConv", "FusedConv"})
POOLS = frozenset({"MaxPool", "AveragePool", "LpPool", "QLinearAveragePool"})
GLOBAL_POOLS = frozenset(
    {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "QLinearGlobalAveragePool"}
)
#: Ops that are size-dependent through where they sample (the others through their values).
SAMPLING_OPS = CONVS | POOLS | {"ConvTranspose", "Resize", "Upsample"}
REDUCES = frozenset(
    """ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum
    ReduceLogSumExp ReduceSumSquare""".split()
)
#: Reduce ops that take ``axes`` as an input from this opset on (attribute before).
AXES_INPUT_FROM = {"ReduceSum": 13}
WHOLE_IMAGE = frozenset(
    {"InstanceNormalization", "GroupNormalization", "DynamicQuantizeLinear", "NonZero"}
)
#: Inputs of ops that are parameters (shapes, axes, pads, ...), not data.
PARAM_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "Slice": (1, 2, 3, 4),
    "Pad": (1, 2, 3),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
    "Split": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "ConstantOfShape": (0,),
    "TopK": (1,),
    "CumSum": (1,),
}
INT_TYPES = frozenset(
    {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8}
)
#: Ops that only select or move values (no arithmetic).
SELECTIONS = frozenset(
    {"Gather", "Slice", "Concat", "Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape"}
)
MAX_PHASES = 4096
MAX_CONST_VALUES = 64


def attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    value = attr(node, name, default)
    if not isinstance(value, int):
        raise Unsupported
    return value


def ints(value: object) -> list[int]:
    if not isinstance(value, list | tuple):
        raise Unsupported
    return [int(v) for v in value]


def floats(value: object) -> list[float]:
    if not isinstance(value, list | tuple):
        raise Unsupported
    return [float(v) for v in value]


def node_name(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def subgraph_inputs(node: onnx.NodeProto) -> list[str]:
    names: list[str] = []
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            for n in g.node:
                names.extend(n.input)
                names.extend(subgraph_inputs(n))
    return names
