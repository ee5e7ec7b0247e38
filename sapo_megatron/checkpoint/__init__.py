"""Checkpoint conversion between Hugging Face and Megatron-Core (see docs/checkpoint.md).

- :mod:`.models`: one module per architecture (``qwen3_moe``, ``qwen3``, ``mixtral``,
  ``dots1`` = the DeepSeek-V3-style MoE block), each with its name table and its
  ``config_from_hf``, and the registry ``MAPPINGS``;
- :mod:`.mapping`: expanding a table into concrete tensors and shapes; ``mapping_for`` /
  ``model_config_from_hf`` look an HF ``config.json`` up in the registry;
- :mod:`.transforms`: the format changes (QKV interleave, gate/up concat), pure functions;
- :mod:`.hf_io` / :mod:`.mcore_io`: streaming readers and writers of the two formats;
- :mod:`.convert`: offline conversion, one layer in memory at a time;
- :mod:`.live`: load into / export from a live sharded model (TP/PP/EP slicing comes from
  :mod:`sapo_megatron.step.sharding`).
"""

from sapo_megatron.checkpoint.convert import hf_to_mcore, mcore_to_hf
from sapo_megatron.checkpoint.hf_io import HFCheckpoint
from sapo_megatron.checkpoint.live import export_hf, load_hf_into_model, load_into_model, save_from_model
from sapo_megatron.checkpoint.mapping import mapping_for, model_config_from_hf
from sapo_megatron.checkpoint.models import MAPPINGS, REFUSED
from sapo_megatron.checkpoint.mcore_io import FORMAT, FORMAT_VERSION, McoreCheckpoint

SUPPORTED_ARCHITECTURES = tuple(sorted(MAPPINGS))

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "HFCheckpoint",
    "MAPPINGS",
    "McoreCheckpoint",
    "REFUSED",
    "SUPPORTED_ARCHITECTURES",
    "export_hf",
    "hf_to_mcore",
    "load_hf_into_model",
    "load_into_model",
    "mapping_for",
    "mcore_to_hf",
    "model_config_from_hf",
    "save_from_model",
]
