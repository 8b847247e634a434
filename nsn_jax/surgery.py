"""Post-hoc surgery: turn chosen dense layers of a (pretrained) model into NSN layers.

Layers are chosen by regular expressions on their module paths ("layers/3/mlp/gate"), never by
name substrings: a preset that matched "proj" anywhere would also catch attention projections.
The paper replaces only the MLP / feed-forward projections; attention can be selected too.

Factors come from the kernel's SVD (least ‖W − W_r‖ at every rank), or, given calibration inputs
captured by `capture_inputs`, from FlexRank's activation-aware SVD (least ‖X(W − W_r)‖ on those
inputs at every rank), which is what the model's outputs feel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import re
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from nsn_jax.flexrank import activation_aware_factors, output_error
from nsn_jax.flops import break_even_rank
from nsn_jax.layers import NSNDense, name_nsn_layers, set_submodule, svd_factors
from nsn_jax.sharding import Layout, place, to_host

MLP_RULES = (r"(^|/)mlp/[^/]+$",)  # every projection of a block's MLP / FFN
ATTENTION_RULES = (r"(^|/)attn/(q|k|v|o)$",)  # the attention projections


@dataclasses.dataclass(frozen=True)
class ReplacedLayer:
  """One layer the surgery replaced.

  `error_at_*` are relative weight errors ‖W − W_r‖_F/‖W‖_F (an activation-aware init trades
  some of these for output error). `output_error_at_half_rank` is ‖X(W − W_r)‖_F/‖XW‖_F at
  r = R/2 on the calibration rows X, None without calibration. `init` is "svd" or
  "activation_aware".
  """

  path: str
  in_features: int
  out_features: int
  max_rank: int
  break_even_rank: float
  error_at_max_rank: float
  error_at_half_rank: float
  init: str
  output_error_at_half_rank: float | None


def chosen_linears(model: nnx.Module, rules: Sequence[str]) -> list[tuple[str, tuple, nnx.Linear]]:
  """(path as "a/0/b", path as graph keys, layer) of each `nnx.Linear` matching any of `rules`.

  Raises ValueError if none matches, listing the dense layers there are. A single string is
  one rule (not a sequence of one-character rules).
  """
  rules = (rules,) if isinstance(rules, str) else rules
  dense = [
    ("/".join(map(str, path)), path, node)
    for path, node in nnx.iter_graph(model)
    if isinstance(node, nnx.Linear)
  ]
  chosen = [entry for entry in dense if any(re.search(rule, entry[0]) for rule in rules)]
  if not chosen:
    raise ValueError(
      f"rules {list(rules)} match none of the model's dense layers: "
      f"{[name for name, _, _ in dense]}."
    )
  return chosen


class _InputRecorder(nnx.Module):
  """Stands in for an `nnx.Linear` while `capture_inputs` runs: hands each input to `record`."""

  def __init__(self, linear: nnx.Linear, record: Callable[[jax.Array], None]):
    self.linear, self.record = linear, record

  def __call__(self, x: jax.Array) -> jax.Array:
    self.record(x)
    return self.linear(x)


def _keep_rows(kept: list[np.ndarray], max_rows: int, name: str, x: jax.Array) -> None:
  """Appends x: (..., d_in) to `kept` as float32 rows (n, d_in) until `max_rows` rows are kept."""
  if isinstance(x, jax.core.Tracer):
    raise ValueError(
      f"capture_inputs got a traced input at {name!r}: the forward function "
      "must run eagerly (not under jax.jit / nnx.jit); rows go to the host."
    )
  room = max_rows - sum(len(rows) for rows in kept)
  if room > 0:
    kept.append(to_host(x).astype(np.float32).reshape(-1, x.shape[-1])[:room])


def capture_inputs(
  model: nnx.Module,
  forward: Callable[[nnx.Module], Any],
  rules: Sequence[str] = MLP_RULES,
  *,
  max_rows: int = 8192,
) -> dict[str, np.ndarray]:
  """The inputs the `nnx.Linear` layers matching `rules` receive while `forward(model)` runs.

  Returns {path: float32 (n_rows, d_in)}: each call's input (..., d_in) flattened to rows, in call
  order, keeping the first `max_rows` rows per layer (the default holds 128 sequences of 64
  tokens; the cap bounds host memory, as every chosen layer keeps its own copy). `forward` must
  run the model eagerly: each chosen layer is swapped for a recorder for the duration of the call
  and put back afterwards, also if `forward` raises, so the model ends exactly as it was.
  Raises ValueError if no layer matches or `forward` never calls a chosen layer.
  """
  chosen = chosen_linears(model, rules)
  kept = {name: [] for name, _, _ in chosen}
  try:
    for name, path, linear in chosen:
      set_submodule(
        model,
        path,
        _InputRecorder(linear, functools.partial(_keep_rows, kept[name], max_rows, name)),
      )
    forward(model)
  finally:
    for _, path, linear in chosen:
      set_submodule(model, path, linear)
  unused = [name for name, rows in kept.items() if not rows]
  if unused:
    raise ValueError(f"forward never called the chosen layers {unused}.")
  return {name: np.concatenate(rows) for name, rows in kept.items()}


def decompose_and_replace(
  model: nnx.Module,
  rules: Sequence[str] = MLP_RULES,
  max_rank: int = 64,
  *,
  calibration: Mapping[str, Any] | None = None,
  layout: Layout | None = None,
) -> tuple[nnx.Module, list[ReplacedLayer]]:
  """A copy of `model` whose `nnx.Linear` layers matching any of `rules` are NSN layers of rank
  min(max_rank, d_in, d_out), and a report of what was replaced.

  Without `calibration` the factors are the kernel's SVD. With `calibration`, {path: activations
  (n_rows, d_in)} as `capture_inputs` returns, each chosen layer gets activation-aware factors
  (`flexrank.activation_aware_factors`): the least output error on those rows at every rank.
  The original model is left untouched. At full rank the new layers reproduce the dense kernels
  up to float32 error (see `error_at_max_rank`). Raises ValueError if no layer matches, listing
  the dense layers there are, or if `calibration` lacks a chosen layer, naming it.

  `layout` (`nsn_jax.sharding.Layout`, paths "<layer path>/a") moves each layer's factors into
  their sharding as soon as they are computed: one layer's SVD at a time is all that is ever
  whole on a device, so a sharded model is decomposed without gathering it.
  """
  model = nnx.clone(model)
  chosen = chosen_linears(model, rules)
  missing = [name for name, _, _ in chosen if calibration is not None and name not in calibration]
  if missing:
    raise ValueError(
      f"calibration has no activations for the chosen layers {missing}; "
      f"it has {sorted(calibration)}."
    )
  report = []
  for name, path, linear in chosen:
    kernel = linear.kernel[...]
    bias = None if linear.bias is None else linear.bias[...]
    rows = None if calibration is None else calibration[name]
    init, factors = _factors(kernel, max_rank, rows, layout, name)
    layer = NSNDense.from_factors(
      *factors, bias, dtype=linear.dtype, param_dtype=linear.param_dtype
    )
    set_submodule(model, path, layer)
    half = max(1, layer.max_rank // 2)
    report.append(
      ReplacedLayer(
        path=name,
        in_features=linear.in_features,
        out_features=linear.out_features,
        max_rank=layer.max_rank,
        break_even_rank=break_even_rank(linear.in_features, linear.out_features),
        error_at_max_rank=_relative_error(layer, kernel, layer.max_rank),
        error_at_half_rank=_relative_error(layer, kernel, half),
        init=init,
        output_error_at_half_rank=None
        if rows is None
        else output_error(kernel, *factors, rows, half),
      )
    )
  name_nsn_layers(model)
  return model, report


def _factors(kernel, max_rank: int, rows, layout, name: str) -> tuple[str, list[jax.Array]]:
  """(init, [a, b]) of the kernel of layer `name`: its SVD, or activation-aware on calibration
  `rows`; each factor moved into `layout("<name>/a", shape)` at once when given (no two layers'
  factors are ever whole on a device together)."""
  if rows is None:
    init, factors = "svd", svd_factors(kernel, max_rank)
  else:
    init, factors = "activation_aware", activation_aware_factors(kernel, rows, max_rank)
  if layout is None:
    return init, list(factors)
  # From the host, each process filling its own devices: a device_put across processes would
  # first compare every process's copy, and LAPACK may differ in the last bit between hosts.
  return init, [
    place(to_host(f), layout(f"{name}/{leaf}", f.shape)) for f, leaf in zip(factors, "ab")
  ]


def nsn_skeleton(
  model: nnx.Module, rules: Sequence[str] = MLP_RULES, max_rank: int = 64
) -> nnx.Module:
  """`decompose_and_replace`'s structure without its arithmetic: a copy of `model` whose chosen
  layers are NSN layers of the same shapes and R with zero factors. Under `nnx.eval_shape` this
  is the restore target of a checkpoint of a decomposed model (no SVD, no report)."""
  model = nnx.clone(model)
  for _, path, linear in chosen_linears(model, rules):
    d_in, d_out = linear.in_features, linear.out_features
    r = min(max_rank, d_in, d_out)
    bias = None if linear.bias is None else linear.bias[...]
    set_submodule(
      model,
      path,
      NSNDense.from_factors(
        jnp.zeros((d_in, r)),
        jnp.zeros((r, d_out)),
        bias,
        dtype=linear.dtype,
        param_dtype=linear.param_dtype,
      ),
    )
  name_nsn_layers(model)
  return model


def _relative_error(layer: NSNDense, kernel, rank: int) -> float:
  kernel = jnp.asarray(kernel, jnp.float32)
  return float(
    jnp.linalg.norm(layer.kernel(rank).astype(jnp.float32) - kernel) / jnp.linalg.norm(kernel)
  )


def format_report(report: list[ReplacedLayer]) -> str:
  """The report as a table; flags layers whose R exceeds the break-even rank.

  err@ columns are relative weight errors; out@R/2 is the relative output error on the
  calibration rows ("-" without calibration).
  """
  lines = [
    f"{'layer':<28} {'d_in':>6} {'d_out':>6} {'R':>5} {'r*':>7} {'init':>16} "
    f"{'err@R':>8} {'err@R/2':>8} {'out@R/2':>8}"
  ]
  for r in report:
    flag = (
      "  (R > r*: the top ranks cost more than dense)" if r.max_rank > r.break_even_rank else ""
    )
    out = "-" if r.output_error_at_half_rank is None else f"{r.output_error_at_half_rank:.3f}"
    lines.append(
      f"{r.path:<28} {r.in_features:>6} {r.out_features:>6} {r.max_rank:>5} "
      f"{r.break_even_rank:>7.1f} {r.init:>16} {r.error_at_max_rank:>8.2e} "
      f"{r.error_at_half_rank:>8.3f} {out:>8}{flag}"
    )
  return "\n".join(lines)
