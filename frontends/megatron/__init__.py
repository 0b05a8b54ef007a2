"""The Megatron frontend: lift legacy ``torch`` and ``torch_dist`` checkpoints into the IR, lazily and safely."""

from .config import MegatronArch, from_args
from .lift import lift
from .reader import CheckpointInfo, DcpStore, MegatronTorchStore, open_checkpoint

__all__ = ["lift", "open_checkpoint", "CheckpointInfo", "MegatronArch", "from_args", "DcpStore", "MegatronTorchStore"]
