"""Small value types of the IR: frozen, hashable, printable.

The layout and sharding of a weight are part of its type, so a pass or a backend can check them without
looking at data.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, replace

import torch

from ..errors import IRError, ParseError


class DType(enum.Enum):
    """Element types. ``value`` is the short name used in the text form."""

    f32 = "f32"
    bf16 = "bf16"
    f16 = "f16"
    f8e4m3 = "f8e4m3"
    i8 = "i8"
    i4 = "i4"
    i64 = "i64"

    @property
    def bits(self) -> int:
        return _BITS[self]

    @property
    def is_float(self) -> bool:
        return self in (DType.f32, DType.bf16, DType.f16, DType.f8e4m3)

    @property
    def torch(self) -> torch.dtype:
        """The torch dtype that stores this type (int4 is stored packed two to an int8)."""
        return _TORCH[self]

    @classmethod
    def from_torch(cls, dt: torch.dtype) -> DType:
        for k, v in _TORCH.items():
            if v == dt and k is not DType.i4:
                return k
        raise IRError(f"unsupported torch dtype {dt}", hint="checkpoints must hold fp32/bf16/fp16/fp8/int8")

    @classmethod
    def parse(cls, text: str) -> DType:
        text = _ALIASES.get(text.lower(), text.lower())
        try:
            return cls(text)
        except ValueError:
            raise ParseError(
                f"unknown dtype {text!r}", hint=f"use one of {', '.join(d.value for d in cls)}"
            ) from None

    @property
    def long_name(self) -> str:
        """The name most tools use (``float32``, ``bfloat16``...)."""
        return _LONG[self]

    def __repr__(self) -> str:
        return f"DType.{self.name}"


_BITS = {DType.f32: 32, DType.bf16: 16, DType.f16: 16, DType.f8e4m3: 8, DType.i8: 8, DType.i4: 4, DType.i64: 64}
_TORCH = {
    DType.f32: torch.float32,
    DType.bf16: torch.bfloat16,
    DType.f16: torch.float16,
    DType.f8e4m3: torch.float8_e4m3fn,
    DType.i8: torch.int8,
    DType.i4: torch.int8,
    DType.i64: torch.int64,
}
_LONG = {
    DType.f32: "float32",
    DType.bf16: "bfloat16",
    DType.f16: "float16",
    DType.f8e4m3: "float8_e4m3fn",
    DType.i8: "int8",
    DType.i4: "int4",
    DType.i64: "int64",
}
_ALIASES = {
    "float32": "f32", "fp32": "f32", "float": "f32",
    "bfloat16": "bf16",
    "float16": "f16", "fp16": "f16", "half": "f16",
    "fp8": "f8e4m3", "float8_e4m3fn": "f8e4m3", "fp8-e4m3": "f8e4m3",
    "int8": "i8", "int4": "i4", "int64": "i64",
}  # fmt: skip

f32, bf16, f16, f8e4m3, i8, i4, i64 = (DType.f32, DType.bf16, DType.f16, DType.f8e4m3, DType.i8, DType.i4,
                                       DType.i64)


@dataclass(frozen=True)
class QKVLayout:
    """Row layout of a fused QKV weight (or bias), global (unsharded) view.

    ``grouped``: Megatron's per-query-group interleave ``[ng, q_per_group + 2, d]`` (q heads, k, v per group).
    ``concat``:  ``[Q (q_heads*d); K (kv_heads*d); V (kv_heads*d)]``.
    """

    kind: str
    q_heads: int
    kv_heads: int
    head_dim: int

    KINDS = ("grouped", "concat")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise IRError(f"unknown QKV layout {self.kind!r}", hint=f"use one of {self.KINDS}")
        if self.q_heads % self.kv_heads:
            raise IRError(f"q_heads={self.q_heads} is not a multiple of kv_heads={self.kv_heads}")

    @property
    def rows(self) -> int:
        return (self.q_heads + 2 * self.kv_heads) * self.head_dim

    def __str__(self) -> str:
        return f"qkv:{self.kind}(q={self.q_heads},kv={self.kv_heads},d={self.head_dim})"


@dataclass(frozen=True)
class TensorType:
    """dtype and logical (global) shape of a tensor, plus its QKV layout when it is a fused QKV tensor."""

    dtype: DType
    shape: tuple[int, ...]
    layout: QKVLayout | None = None

    def __post_init__(self):
        if any((not isinstance(s, int)) or s < 0 for s in self.shape):
            raise IRError(f"bad shape {self.shape}")
        if self.layout is not None and (not self.shape or self.shape[0] != self.layout.rows):
            raise IRError(f"shape {self.shape} disagrees with {self.layout} ({self.layout.rows} rows)")

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return (self.numel * self.dtype.bits + 7) // 8

    def with_(self, **kw) -> TensorType:
        return replace(self, **kw)

    def __str__(self) -> str:
        s = f"{self.dtype.value}[{','.join(map(str, self.shape))}]"
        return f"{s} {self.layout}" if self.layout else s

    _RE = re.compile(
        r"^(?P<dt>\w+)\[(?P<shape>[\d,\s]*)\](?:\s+qkv:(?P<kind>\w+)\(q=(?P<q>\d+),kv=(?P<kv>\d+),d=(?P<d>\d+)\))?$"
    )

    @classmethod
    def parse(cls, text: str) -> TensorType:
        m = cls._RE.match(text.strip())
        if not m:
            raise ParseError(f"bad tensor type {text!r}", hint="write it as f32[128,64] or bf16[192,64] qkv:...")
        shape = tuple(int(x) for x in m["shape"].replace(" ", "").split(",") if x)
        layout = None
        if m["kind"]:
            layout = QKVLayout(m["kind"], int(m["q"]), int(m["kv"]), int(m["d"]))
        return cls(DType.parse(m["dt"]), shape, layout)


@dataclass(frozen=True)
class Sharding:
    """How the *target* splits a weight across ranks of one parallel axis.

    ``dim=None`` means replicated. ``axis`` is ``tp`` (tensor) or ``ep`` (expert). A fused QKV weight is
    split per its layout (whole query groups for ``grouped``; ``[Q_r;K_r;V_r]`` for ``concat``, KV heads
    replicated when ``parts`` exceeds the KV heads).
    """

    dim: int | None = None
    parts: int = 1
    axis: str = "tp"

    def __post_init__(self):
        if self.parts < 1:
            raise IRError(f"sharding parts must be >= 1, got {self.parts}")
        if self.axis not in ("tp", "ep"):
            raise IRError(f"unknown sharding axis {self.axis!r}")

    @property
    def replicated(self) -> bool:
        return self.dim is None or self.parts == 1

    def __str__(self) -> str:
        if self.dim is None:
            return "replicated" if self.parts == 1 else f"replicated({self.axis}={self.parts})"
        return f"split(dim={self.dim},{self.axis}={self.parts})"

    _RE = re.compile(r"^(?:replicated(?:\((?P<rax>tp|ep)=(?P<rparts>\d+)\))?|split\(dim=(?P<dim>-?\d+),(?P<ax>tp|ep)=(?P<parts>\d+)\))$")

    @classmethod
    def parse(cls, text: str) -> Sharding:
        m = cls._RE.match(text.strip())
        if not m:
            raise ParseError(f"bad sharding {text!r}", hint="write replicated or split(dim=0,tp=2)")
        if m["dim"] is not None:
            return cls(int(m["dim"]), int(m["parts"]), m["ax"])
        if m["rparts"]:
            return cls(None, int(m["rparts"]), m["rax"])
        return cls()


REPLICATED = Sharding()


@dataclass(frozen=True)
class Rope:
    """Rotary position embedding parameters."""

    base: float = 10000.0
    percent: float = 1.0           # fraction of head_dim that rotates
    interleaved: bool = False      # False: rotate-half (NeoX/HF Llama); True: GPT-J pairs
    scaling: str = "none"          # none | linear | llama3 | yarn
    factor: float = 1.0
    low_freq_factor: float = 1.0   # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_positions: int = 8192
    beta_fast: float = 32.0        # yarn: correction-range rotations (megatron-core YarnRotaryEmbedding)
    beta_slow: float = 1.0         # yarn
    mscale: float = 1.0            # yarn: cos/sin x get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
    mscale_all_dim: float = 0.0    # yarn
    truncate: bool = True          # yarn: correction range rounded to ints (correction_range_round_to_int)

    def rotary_dim(self, head_dim: int) -> int:
        return int(head_dim * self.percent)

    def rotated_dim(self, head_dim: int) -> int:
        """The channels that actually rotate: 2 x the ``arange(0, rotary_dim, 2)`` frequencies, i.e.
        ``rotary_dim`` rounded up to even (megatron-core ``RotaryEmbedding`` cats the frequencies twice and
        ``_apply_rotary_pos_emb_bshd`` rotates ``freqs.shape[-1]`` channels: rotary_percent 0.3125 of 16 -> 6)."""
        return 2 * ((self.rotary_dim(head_dim) + 1) // 2)


@dataclass(frozen=True)
class Parallelism:
    """The parallel layout a model is laid out for."""

    tp: int = 1
    pp: int = 1
    ep: int = 1

    def __post_init__(self):
        for k in ("tp", "pp", "ep"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise IRError(f"{k} must be a positive integer, got {v!r}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def __str__(self) -> str:
        return f"tp={self.tp} pp={self.pp} ep={self.ep}"


@dataclass(frozen=True)
class ModelConfig:
    """Model-wide facts that no single node owns."""

    family: str                      # gpt | llama | mixtral | qwen | gemma | starcoder | nemotron | falcon ...
    hidden_size: int
    num_layers: int
    vocab_size: int                  # the tokenizer's vocab (logits beyond it are padding)
    max_position_embeddings: int = 4096
    dtype: DType = DType.f32         # dtype of the weights as lifted
    extra: tuple[tuple[str, object], ...] = field(default=())  # free-form, sorted (key, value) pairs

    def get(self, key: str, default=None):
        return dict(self.extra).get(key, default)
