"""A small ONNX graph builder with streamed external weights.

Weights never live in the ModelProto: :class:`ExternalData` writes each tensor's bytes into the one
``model.onnx.data`` file as it is produced (materialize, write, drop) and hands back a ``TensorProto`` that only
points at it (``location``/``offset``/``length``). Shape and axes constants stay inline (ORT cannot shape-infer
from external data), so the proto stays small whatever the model's size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ...errors import BackendError
from ..base import OutputFile, new_checksum

TORCH_TO_ONNX = {
    torch.float32: TensorProto.FLOAT,
    torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16,
    torch.int8: TensorProto.INT8,
    torch.uint8: TensorProto.UINT8,
    torch.int32: TensorProto.INT32,
    torch.int64: TensorProto.INT64,
}

_ALIGN_SMALL = 64
_ALIGN_LARGE = 4096          # page-aligned big tensors so runtimes can mmap them
_LARGE = 1 << 20


class ExternalData:
    """Append-only writer of one external data file; records a checksum (xxh3-128) per tensor."""

    def __init__(self, path: Path, on_tensor=None):
        self.on_tensor = on_tensor
        self.path = Path(path)
        self.location = self.path.name
        self.f = OutputFile(self.path)
        self.offset = 0
        self.sums: dict[str, str] = {}
        self.count = 0

    def add(self, name: str, t: torch.Tensor, onnx_type: int | None = None,
            dims: tuple[int, ...] | None = None) -> TensorProto:
        """Write ``t`` (its raw little-endian bytes) and return an external ``TensorProto`` for it.

        ``onnx_type``/``dims`` override the torch view (int4 is passed as packed uint8 bytes)."""
        if name in self.sums:
            raise BackendError(f"initializer {name!r} written twice", hint="this is a bug in the ONNX emitter")
        t = t.detach().contiguous()
        if onnx_type is None:
            if t.dtype not in TORCH_TO_ONNX:
                raise BackendError(f"initializer {name}: unsupported dtype {t.dtype}")
            onnx_type = TORCH_TO_ONNX[t.dtype]
        dims = tuple(t.shape) if dims is None else tuple(dims)
        raw = t.reshape(-1).view(torch.uint8)
        n = raw.numel()
        align = _ALIGN_LARGE if n >= _LARGE else _ALIGN_SMALL
        pad = (-self.offset) % align
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        h = new_checksum()
        self.f.write(raw, h)
        tp = TensorProto()
        tp.name = name
        tp.data_type = onnx_type
        tp.dims.extend(dims)
        tp.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.location), ("offset", str(self.offset)), ("length", str(n))):
            e = tp.external_data.add()
            e.key, e.value = k, v
        self.offset += n
        self.sums[name] = h.hexdigest()
        self.count += 1
        if self.on_tensor:
            self.on_tensor(name, n)
        return tp

    def close(self):
        self.f.close()


class GraphBuilder:
    """Collects nodes, inline constants (de-duplicated) and external initializers."""

    def __init__(self, data: ExternalData):
        self.data = data
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._consts: dict[tuple, str] = {}
        self._names: set[str] = set()
        self.op_types: set[tuple[str, str]] = set()

    # -- names -----------------------------------------------------------------------------------------------
    def _unique(self, name: str) -> str:
        base, i = name, 1
        while name in self._names:
            name = f"{base}_{i}"
            i += 1
        self._names.add(name)
        return name

    # -- nodes -----------------------------------------------------------------------------------------------
    def op(self, op_type: str, inputs: list[str], name: str, *, outputs: int | list[str] = 1, domain: str = "",
           **attrs) -> str | list[str]:
        """Add a node named ``name``; returns its output name (or the list, when several)."""
        name = self._unique(name)
        if isinstance(outputs, int):
            outs = [f"{name}/output_{k}" for k in range(outputs)]
        else:
            outs = list(outputs)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain or None, **attrs))
        self.op_types.add((domain or "", op_type))
        return outs[0] if len(outs) == 1 else outs

    # -- constants -------------------------------------------------------------------------------------------
    def const(self, value, dtype=np.int64) -> str:
        """An inline (not external) constant initializer, shared by value."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            shape = "x".join(map(str, arr.shape)) or "scalar"
            flat = "_".join(str(x) for x in arr.reshape(-1)[:8].tolist())
            name = self._unique(f"/model/constants/{arr.dtype.name}/{shape}/{flat}")
            self.initializers.append(onnx.numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def weight(self, name: str, t: torch.Tensor, onnx_type: int | None = None, dims=None) -> str:
        """An external initializer: the bytes go to the data file now."""
        self._names.add(name)
        self.initializers.append(self.data.add(name, t, onnx_type, dims))
        return name

    # -- I/O -------------------------------------------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        self._names.add(name)
        return name

    def output(self, name: str, elem_type: int, shape: list):
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def model(self, opsets: dict[str, int], ir_version: int = 11, producer: str = "mexc") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "mexc-decoder", self.inputs, self.outputs, self.initializers)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              producer_name=producer, ir_version=ir_version)
        return m
