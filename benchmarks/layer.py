"""Per-rank inference of one NSNDense, against a dense layer and a bare matmul in the same run.

Each rank is measured three times: `nsn`, the NSN layer jitted at a static rank (real slices of
the factors), and `deployed`, the layer as `nsn_jax.deploy` serves that rank, under each form
policy (`policy` column): "cheapest" (fewest FLOPs: folded dense, factorised or GAR) and "matmul"
(folded dense or factorised, no gather). The bare `x @ w` of the same shape is the machine's
practical roofline: what one matmul of this size achieves here and now.
"""

from __future__ import annotations

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (
  Column,
  SuiteResult,
  eval_program,
  latency_columns,
  latency_fields,
  summary_line,
  time_jax,
  xla_flops,
)
from benchmarks.timing import Policy
from nsn_jax import flops
from nsn_jax.deploy import POLICIES, deploy
from nsn_jax.layers import NSNDense


@dataclasses.dataclass(frozen=True)
class LayerGrid:
  """A d × d layer with max rank R, measured at each batch size."""

  d: int
  max_rank: int
  batches: tuple[int, ...]

  @property
  def ranks(self) -> tuple[int, ...]:
    r = self.max_rank
    return (r // 16, r // 8, r // 4, r // 2, 3 * r // 4, r)


GRIDS = {"tiny": LayerGrid(64, 32, (8,)), "full": LayerGrid(4096, 2048, (64, 1024))}

COLUMNS = (
  Column("kind", "kind"),
  Column("batch", "batch"),
  Column("rank", "rank"),
  Column("policy", "policy"),
  Column("form", "form"),
  *latency_columns(".1f"),
  Column("vs_matmul", "FLOP/s/matmul", ".3f"),
)


def run(size: str, policy: Policy) -> SuiteResult:
  grid = GRIDS[size]
  keys = nnx.Rngs(0)
  nsn = NSNDense(grid.d, grid.d, grid.max_rank, rngs=keys)
  dense = nnx.Linear(grid.d, grid.d, rngs=keys)
  (nsn_forward, nsn_state), (dense_forward, dense_state) = map(eval_program, (nsn, dense))
  kernel = dense.kernel[...]
  matmul = jax.jit(jnp.matmul)
  # The deployed layer at each rank and policy (deploy works on models; this one is the layer).
  deployed = {
    (form_policy, r): eval_program(module) + (module,)
    for form_policy in POLICIES
    for r in grid.ranks
    for module in [_deployed_layer(nsn, r, form_policy)]
  }

  rng = np.random.default_rng(1)  # host-side inputs: no random-number programs to compile
  rows = []
  for batch in grid.batches:
    x = jax.device_put(rng.standard_normal((batch, grid.d), np.float32))
    # (kind, rank, form policy, form, program, its arguments, analytic FLOPs)
    measured = [
      ("matmul", None, None, None, matmul, (x, kernel), 2 * batch * grid.d * grid.d),
      (
        "dense",
        None,
        None,
        None,
        dense_forward,
        (dense_state, x, None),
        batch * flops.dense_flops(grid.d, grid.d),
      ),
      *[
        (
          "nsn",
          r,
          None,
          None,
          nsn_forward,
          (nsn_state, x, r),
          batch * flops.nsn_layer_flops(nsn, r),
        )
        for r in grid.ranks
      ],
      *[
        (
          "deployed",
          r,
          form_policy,
          module.form,
          fn,
          (state, x, None),
          batch * module.flops_per_row(),
        )
        for (form_policy, r), (fn, state, module) in deployed.items()
      ],
    ]
    for kind, rank, form_policy, form, fn, args, analytic in measured:
      counted = xla_flops(fn, *args)  # compiles the program the timed calls then reuse
      timing = time_jax(fn, *args, policy=policy)
      rows.append(
        {
          "kind": kind,
          "batch": batch,
          "rank": rank,
          "d": grid.d,
          "policy": form_policy,
          "form": form,
          "max_rank": grid.max_rank,
          **latency_fields(timing, analytic, counted),
        }
      )
    batch_rows = [row for row in rows if row["batch"] == batch]
    dense_row, matmul_row = _find(batch_rows, "dense"), _find(batch_rows, "matmul")
    for row in batch_rows:
      row["vs_dense"] = row["latency_s"] / dense_row["latency_s"]
      row["vs_matmul"] = row["flops_per_s"] / matmul_row["flops_per_s"]
  return SuiteResult(rows, _summary(rows, grid, size), [], COLUMNS)


class _Holder(nnx.Module):
  def __init__(self, layer):
    self.layer = layer


def _deployed_layer(layer: NSNDense, rank: int, policy: str):
  return deploy(_Holder(layer), rank, policy)[0].layer


def _find(rows, kind, rank=None):
  return next(row for row in rows if row["kind"] == kind and row["rank"] == rank)


def _summary(rows, grid: LayerGrid, size: str) -> list[dict]:
  r = grid.max_rank
  summary = []
  for batch in grid.batches:
    batch_rows = [row for row in rows if row["batch"] == batch]
    nsn_rows = [row for row in batch_rows if row["kind"] == "nsn"]
    judged = size == "full" and batch == max(grid.batches)  # the targets: batch 1024
    summary += [
      summary_line(
        f"batch {batch}: latency(R/4) / latency(R)",
        _find(batch_rows, "nsn", r // 4)["latency_s"] / _find(batch_rows, "nsn", r)["latency_s"],
        judged=judged,
        at_most=0.30,
      ),
      summary_line(
        f"batch {batch}: slowest rank's latency / dense layer latency (static factorised slices)",
        max(row["vs_dense"] for row in nsn_rows),
      ),
      *[
        summary_line(
          f"batch {batch}: slowest rank's latency / dense layer latency (deployed, "
          f"form policy {form_policy!r})",
          max(
            row["vs_dense"]
            for row in batch_rows
            if row["kind"] == "deployed" and row["policy"] == form_policy
          ),
          judged=judged,
          at_most=1.05,
        )
        for form_policy in POLICIES
      ],
      summary_line(
        f"batch {batch}: NSN FLOP/s at R / same-run matmul FLOP/s",
        _find(batch_rows, "nsn", r)["vs_matmul"],
        judged=judged,
        at_least=0.85,
      ),
      summary_line(
        f"batch {batch}: lowest NSN FLOP/s over ranks / same-run matmul FLOP/s",
        min(row["vs_matmul"] for row in nsn_rows),
        judged=judged,
        at_least=0.85,
      ),
    ]
  return summary
