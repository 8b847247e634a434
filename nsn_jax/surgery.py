"""Post-hoc surgery: turn chosen dense layers of a (pretrained) model into NSN layers.

Layers are chosen by regular expressions on their module paths ("layers/3/mlp/gate"), never by
name substrings: a preset that matched "proj" anywhere would also catch attention projections.
The paper replaces only the MLP / feed-forward projections; attention can be selected too.
"""
from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import re

import jax.numpy as jnp
from flax import nnx

from nsn_jax.flops import break_even_rank
from nsn_jax.layers import NSNDense, name_nsn_layers, set_submodule

MLP_RULES = (r"(^|/)mlp/[^/]+$",)                 # every projection of a block's MLP / FFN
ATTENTION_RULES = (r"(^|/)attn/(q|k|v|o)$",)       # the attention projections


@dataclasses.dataclass(frozen=True)
class ReplacedLayer:
  """One layer the surgery replaced. Errors are relative Frobenius norms ‖W − W_r‖/‖W‖."""
  path: str
  in_features: int
  out_features: int
  max_rank: int
  break_even_rank: float
  error_at_max_rank: float
  error_at_half_rank: float


def decompose_and_replace(model: nnx.Module, rules: Sequence[str] = MLP_RULES,
                          max_rank: int = 64) -> tuple[nnx.Module, list[ReplacedLayer]]:
  """A copy of `model` whose `nnx.Linear` layers matching any of `rules` are SVD-initialised
  NSN layers of rank min(max_rank, d_in, d_out), and a report of what was replaced.

  The original model is left untouched. At full rank the new layers reproduce the dense kernels
  up to float32 SVD error (see `error_at_max_rank`). Raises ValueError if no layer matches,
  listing the dense layers there are.
  """
  model = nnx.clone(model)
  dense = [("/".join(map(str, path)), path, node) for path, node in nnx.iter_graph(model)
           if isinstance(node, nnx.Linear)]
  chosen = [entry for entry in dense if any(re.search(rule, entry[0]) for rule in rules)]
  if not chosen:
    raise ValueError(f"rules {list(rules)} match none of the model's dense layers: "
                     f"{[name for name, _, _ in dense]}.")
  report = []
  for name, path, linear in chosen:
    kernel = linear.kernel[...]
    bias = None if linear.bias is None else linear.bias[...]
    layer = NSNDense.from_dense(kernel, bias, max_rank, dtype=linear.dtype,
                                param_dtype=linear.param_dtype)
    set_submodule(model, path, layer)
    report.append(ReplacedLayer(
        path=name, in_features=linear.in_features,
        out_features=linear.out_features, max_rank=layer.max_rank,
        break_even_rank=break_even_rank(linear.in_features, linear.out_features),
        error_at_max_rank=_relative_error(layer, kernel, layer.max_rank),
        error_at_half_rank=_relative_error(layer, kernel, max(1, layer.max_rank // 2))))
  name_nsn_layers(model)
  return model, report


def _relative_error(layer: NSNDense, kernel, rank: int) -> float:
  kernel = jnp.asarray(kernel, jnp.float32)
  return float(jnp.linalg.norm(layer.kernel(rank).astype(jnp.float32) - kernel) /
               jnp.linalg.norm(kernel))


def format_report(report: list[ReplacedLayer]) -> str:
  """The report as a table; flags layers whose R exceeds the break-even rank."""
  lines = [f"{'layer':<28} {'d_in':>6} {'d_out':>6} {'R':>5} {'r*':>7} {'err@R':>8} {'err@R/2':>8}"]
  for r in report:
    flag = "  (R > r*: the top ranks cost more than dense)" if r.max_rank > r.break_even_rank else ""
    lines.append(f"{r.path:<28} {r.in_features:>6} {r.out_features:>6} {r.max_rank:>5} "
                 f"{r.break_even_rank:>7.1f} {r.error_at_max_rank:>8.2e} "
                 f"{r.error_at_half_rank:>8.3f}{flag}")
  return "\n".join(lines)
