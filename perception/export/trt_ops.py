"""ONNX operators TensorRT's ONNX parser supports (onnx-tensorrt ``docs/operators.md``, TensorRT 8.4+;
the later 10.x lists only add to it). Used by a static check of exported graphs: anything outside
this set and outside the ``segnet`` plugin domain would fail to parse on a GPU machine we cannot test
on here. Ops TensorRT explicitly rejects are listed too, to make the check's failure message precise.
"""

from __future__ import annotations

TENSORRT_SUPPORTED_OPS: frozenset[str] = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu
    Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div
    Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm
    GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GRU HardSigmoid Identity If
    ImageScaler InstanceNormalization IsNaN LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
    LpNormalization LpPool MatMul Max MaxPool Mean Min Mod Mul Neg NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu
    QuantizeLinear RandomUniform RandomUniformLike Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
    ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize Round ScaledTanh
    Scan Scatter ScatterElements ScatterND Selu Shape Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
    Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Unsqueeze
    Upsample Where Xor
    """.split()
)

# Rejected by the parser (or only in a form we do not use): MaxPool's Indices output, MaxUnpool.
# (Mod, NonZero and OneHot are supported by TensorRT 10's parser: operators.md lists them.)
TENSORRT_REJECTED_OPS: frozenset[str] = frozenset({"MaxUnpool", "Unique"})
