"""Hugging Face layout target (``--target hf``): see :mod:`.backend`, the name table in :mod:`.names` and the
family rules in :mod:`.families`."""

from __future__ import annotations

from ..base import BACKENDS, register_backend
from .backend import MAX_SHARD_BYTES, HFBackend, max_shard_bytes, plan
from .families import classify, hf_config
from .names import RULES, describe

if "hf" not in BACKENDS:
    register_backend(HFBackend())

__all__ = ["HFBackend", "MAX_SHARD_BYTES", "max_shard_bytes", "plan", "classify", "hf_config", "RULES",
           "describe"]
