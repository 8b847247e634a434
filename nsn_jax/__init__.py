"""nsn_jax: nested low-rank networks in JAX/Flax.

`import nsn_jax as nsn` gives the public API under stable names (docs/api.md); each is
imported on first use, so `import nsn_jax` itself stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name → the module that defines it ("module:attribute" where the names differ). These names
# are the stable API; modules may move.
_API = {
  # the layer
  "NSNDense": "nsn_jax.layers",
  "NSNFactor": "nsn_jax.layers",
  "at_rank": "nsn_jax.layers",
  "current_rank": "nsn_jax.layers",
  "apply": "nsn_jax.layers",
  "nsn_layers": "nsn_jax.layers",
  # pretrained models into nested ones
  "decompose_and_replace": "nsn_jax.surgery",
  "capture_inputs": "nsn_jax.surgery",
  "MLP_RULES": "nsn_jax.surgery",
  "ATTENTION_RULES": "nsn_jax.surgery",
  "load_gguf": "nsn_jax.llm",
  "load_hf_bert": "nsn_jax.llm",
  "load_hf_decoder": "nsn_jax.llm",
  "load_pretrained": "nsn_jax.llm",
  "render_chat": "nsn_jax.llm",
  "generate": "nsn_jax.llm.decode",
  "Decoder": "nsn_jax.llm.decode",
  "Sampling": "nsn_jax.llm.decode",
  # budgets and FLOPs
  "model_flops": "nsn_jax.flops",
  "dense_model_flops": "nsn_jax.flops",
  "active_params": "nsn_jax.flops",
  "break_even_rank": "nsn_jax.flops",
  "rank_for_budget": "nsn_jax.flops",
  "search_profiles": "nsn_jax.profiles",
  # training, restoring, evaluating, serving one budget
  "defaults": "nsn_jax.config",
  "validate": "nsn_jax.config",
  "ConfigError": "nsn_jax.config",
  "CheckpointError": "nsn_jax.checkpoint",
  "StoppedEarly": "nsn_jax.train_lib",
  "WorkdirLockedError": "nsn_jax.workdir",
  "build_model": "nsn_jax.build",
  "train_and_evaluate": "nsn_jax.train_lib",
  "create_train_state": "nsn_jax.train_step",
  "make_train_step": "nsn_jax.train_step",
  "restore_model": "nsn_jax.restore",
  "run_sweep": "nsn_jax.sweep",
  "save_arrays": "nsn_jax.data.arrays",
  "keep_freed_memory": "nsn_jax.host_memory",
  # `deploy` and `export` are also submodules of this package, which Python binds here when
  # imported: these two keep distinct names.
  "deploy_model": "nsn_jax.deploy:deploy",
  "export_model": "nsn_jax.export:export",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
  if name not in _API:
    raise AttributeError(f"module 'nsn_jax' has no attribute {name!r}")
  module, _, attribute = _API[name].partition(":")
  value = getattr(importlib.import_module(module), attribute or name)
  globals()[name] = value  # later lookups skip this function
  return value


def __dir__() -> list[str]:
  return sorted([*globals(), *_API])
