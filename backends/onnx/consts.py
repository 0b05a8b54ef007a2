"""Constants of mexc's ONNX decoders: the opset, the contrib domain, the I/O element types and the dimension
names (the onnxruntime-genai / Optimum convention)."""

import numpy as np
import torch
from onnx import TensorProto

from ...ir.types import DType

OPSET = 23
MS = "com.microsoft"

IO_TYPES = {DType.f32: TensorProto.FLOAT, DType.f16: TensorProto.FLOAT16, DType.bf16: TensorProto.BFLOAT16}
IO_TORCH = {DType.f32: torch.float32, DType.f16: torch.float16, DType.bf16: torch.bfloat16}
IO_NUMPY = {DType.f32: np.float32, DType.f16: np.float16}

B, S, T, P = "batch_size", "sequence_length", "total_sequence_length", "past_sequence_length"
