"""Deployment: a fixed-budget copy of a nested model, each NSN layer in its cheapest form.

Training keeps every rank in one parameter set; serving one budget needs only that budget's
weights. At a fixed rank r an NSN layer (factors a: (d_in, R), b: (R, d_out)) can run as

  dense       x @ (a_r b_r)
  factorised  (x @ a_r) @ b_r
  gar         (x[:, rows] + x[:, rest] @ n) @ m

(GAR, FlexRank's gauge-aligned reparametrisation, see `nsn_jax.flexrank.gar_factors`; the cost
of each form is `flops.form_flops`.) `deploy` picks one per layer — by default the fewest FLOPs
(`flops.cheapest_form`), so a layer above its break-even rank is folded into one dense kernel
and no layer costs more than dense — and stores only what that form reads, so parameters and
FLOPs both shrink. Each form is an ordinary module called as `layer(x)` that reports its cost
through `flops_per_row()`, so a deployed model runs with `rank=None` (no NSN layer is left for
a rank scope to reach).

The policy "matmul" picks between dense and factorised only (the break-even rank
r* = d_in·d_out/(d_in + d_out)), never GAR. GAR saves 2r² FLOPs per row but first gathers every
input row along its feature axis, and on CPU that gather costs far more per element than a
multiply-add, so GAR loses wherever 2r² is small against d_in and can win only where r² is large.
The measured latencies are in docs/benchmarks.md (summary in docs/design.md, "Deployment form
per layer"). Use "matmul" for CPU latency at small ranks, "cheapest" for the fewest FLOPs and
parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from nsn_jax import flexrank, flops
from nsn_jax.layers import (
  NSNDense,
  Rank,
  check_static_rank,
  nsn_layers,
  resolve_rank,
  set_submodule,
)

FORMS = flops.FORMS
POLICIES = ("cheapest", "matmul")  # form choices made per layer (see the module docstring)


class GatherIndex(nnx.Variable):
  """Integer indices a deployed layer gathers with (GAR's pivot permutation); not trained."""


class FixedRankLayer(nnx.Module):
  """Base of the deployed forms: a d_in → d_out map at one fixed rank, built empty (zeros) from
  its shapes so a checkpoint can be restored into it, then filled by `deploy`."""

  form: str

  def __init__(
    self,
    in_features: int,
    out_features: int,
    rank: int,
    use_bias: bool,
    dtype=None,
    param_dtype=jnp.float32,
  ):
    self.in_features, self.out_features, self.rank = in_features, out_features, rank
    self.dtype = dtype
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
    self._init_params(param_dtype)

  def _init_params(self, param_dtype) -> None:
    """Creates the form's own (zero) parameters."""
    raise NotImplementedError

  def flops_per_row(self) -> int:
    """Forward FLOPs per input row (multiply-add = 2, bias add = 1): how `nsn_jax.flops`
    counts a module whose cost no rank changes."""
    return flops.form_flops(
      self.form, self.in_features, self.out_features, self.rank, self.bias is not None
    )

  def _add_bias(self, y: jax.Array) -> jax.Array:
    return y if self.bias is None else y + self.bias[...].astype(y.dtype)


class DenseForm(FixedRankLayer):
  """y = x @ kernel + bias with kernel = a_r b_r folded: (d_in, d_out)."""

  form = "dense"

  def _init_params(self, param_dtype) -> None:
    self.kernel = nnx.Param(jnp.zeros((self.in_features, self.out_features), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (..., d_in) → (..., d_out)."""
    x, kernel = nnx.nn.dtypes.promote_dtype((x, self.kernel[...]), dtype=self.dtype)
    return self._add_bias(x @ kernel)


class FactorisedForm(FixedRankLayer):
  """y = (x @ a) @ b + bias with the rank-r prefixes a: (d_in, r), b: (r, d_out)."""

  form = "factorised"

  def _init_params(self, param_dtype) -> None:
    self.a = nnx.Param(jnp.zeros((self.in_features, self.rank), param_dtype))
    self.b = nnx.Param(jnp.zeros((self.rank, self.out_features), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x, a, b = nnx.nn.dtypes.promote_dtype((x, self.a[...], self.b[...]), dtype=self.dtype)
    return self._add_bias((x @ a) @ b)


class GARForm(FixedRankLayer):
  """y = (x[perm[:r]] + x[perm[r:]] @ n) @ m + bias: n (d_in − r, r), m (r, d_out), perm (d_in,)."""

  form = "gar"

  def _init_params(self, param_dtype) -> None:
    self.perm = GatherIndex(jnp.arange(self.in_features, dtype=jnp.int32))
    self.n = nnx.Param(jnp.zeros((self.in_features - self.rank, self.rank), param_dtype))
    self.m = nnx.Param(jnp.zeros((self.rank, self.out_features), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x, n, m = nnx.nn.dtypes.promote_dtype((x, self.n[...], self.m[...]), dtype=self.dtype)
    x = jnp.take(x, self.perm[...], axis=-1)
    # The pivot rows of the gauge-aligned factor are the identity: an add, not a matmul.
    return self._add_bias((x[..., : self.rank] + x[..., self.rank :] @ n) @ m)


FORM_CLASSES = {cls.form: cls for cls in (DenseForm, FactorisedForm, GARForm)}


@dataclasses.dataclass(frozen=True)
class DeployedLayer:
  """What `deploy` did to one NSN layer; FLOPs per row, parameters stored (factors or kernel)."""

  path: str
  in_features: int
  out_features: int
  use_bias: bool
  rank: int
  form: str
  flops: int
  params: int


def choose_form(d_in: int, d_out: int, rank: int, policy: str = "cheapest") -> str:
  """The form a layer takes: `policy` itself; with "cheapest" the fewest FLOPs per row; with
  "matmul" dense or factorised, whichever has fewer FLOPs (dense on a tie: one matmul)."""
  if policy == "cheapest":
    return flops.cheapest_form(d_in, d_out, rank)
  if policy == "matmul":
    return flops.cheapest_form(d_in, d_out, rank, ("dense", "factorised"))
  if policy not in FORMS:
    raise ValueError(f"form policy must be one of {POLICIES} or {FORMS}, got {policy!r}.")
  return policy


def _filled(layer: NSNDense, rank: int, form: str) -> FixedRankLayer:
  """The NSN layer at `rank` as a module of `form`, holding only what that form reads.

  Computed on the host (numpy): a one-off, and the results land on the default device whatever
  layout the trained factors had.
  """
  out = FORM_CLASSES[form](
    layer.in_features,
    layer.out_features,
    rank,
    layer.bias is not None,
    layer.dtype,
    layer.param_dtype,
  )
  a, b = np.asarray(layer.a[...][:, :rank]), np.asarray(layer.b[...][:rank])
  if form == "dense":
    values = {"kernel": a.astype(np.float64) @ b}
  elif form == "factorised":
    values = {"a": a, "b": b}
  else:
    perm, n, m = flexrank.gar_factors(a, b, rank)
    values = {"n": n, "m": m}
    out.perm[...] = jnp.asarray(perm, jnp.int32)
  if layer.bias is not None:
    values["bias"] = layer.bias[...]
  for name, value in values.items():
    getattr(out, name)[...] = jnp.asarray(np.asarray(value), layer.param_dtype)
  return out


def deploy(
  model: nnx.Module, rank: Rank = None, form: str | Mapping[str, str] = "cheapest"
) -> tuple[nnx.Module, list[DeployedLayer]]:
  """A copy of `model` fixed at `rank` (an int, a profile {path: int}, or None = each layer's R).

  Every NSN layer becomes a `FixedRankLayer` of the form `form` names: "cheapest" (default: the
  fewest FLOPs per row, see the module docstring), "matmul" (dense or factorised, no gather: the
  faster choice on CPU), "dense", "factorised", "gar", or a mapping {path: policy}. The copy
  runs with `rank=None`, stores only the chosen forms' parameters and
  reproduces `model(x, rank)` up to float32 rounding. `model` is left untouched. Raises
  ValueError for a rank outside a layer's 1..R, naming the layer.
  """
  layers = nsn_layers(model)
  if not layers:
    raise ValueError("the model has no NSN layers to deploy.")
  plan = []
  for path, layer in layers.items():
    layer_rank = resolve_rank(rank, path)
    r = (
      layer.max_rank
      if layer_rank is None
      else check_static_rank(layer_rank, layer.max_rank, f"layer {path!r}")
    )
    policy = form.get(path, "cheapest") if isinstance(form, Mapping) else form
    plan.append((path, r, choose_form(layer.in_features, layer.out_features, r, policy)))
  deployed = nnx.clone(model)
  report = []
  for (path, r, chosen), layer in zip(plan, nsn_layers(deployed).values()):
    module = _filled(layer, r, chosen)
    set_submodule(deployed, path, module)
    report.append(
      DeployedLayer(
        path,
        layer.in_features,
        layer.out_features,
        layer.bias is not None,
        r,
        chosen,
        module.flops_per_row(),
        sum(p.size for p in jax.tree.leaves(nnx.state(module, nnx.Param))),
      )
    )
  return deployed, report


def empty_like(model: nnx.Module, report: list[DeployedLayer]) -> nnx.Module:
  """`model` (an NSN model, e.g. abstract from `nnx.eval_shape`) with each layer of `report`
  replaced by an empty module of its recorded form: the target an exported checkpoint restores
  into."""
  for entry in report:
    layer = nsn_layers(model)[entry.path]
    set_submodule(
      model,
      entry.path,
      FORM_CLASSES[entry.form](
        entry.in_features,
        entry.out_features,
        entry.rank,
        entry.use_bias,
        layer.dtype,
        layer.param_dtype,
      ),
    )
  return model


def format_report(report: list[DeployedLayer]) -> str:
  """The per-layer forms as a table."""
  lines = [
    f"{'layer':<28} {'d_in':>6} {'d_out':>6} {'rank':>5} {'form':>10} {'FLOPs/row':>11} "
    f"{'params':>10}"
  ]
  lines += [
    f"{e.path:<28} {e.in_features:>6} {e.out_features:>6} {e.rank:>5} {e.form:>10} "
    f"{e.flops:>11,} {e.params:>10,}"
    for e in report
  ]
  return "\n".join(lines)
