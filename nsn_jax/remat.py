"""Rematerialisation of model blocks: activation memory that does not grow with depth × ranks.

The multi-rank step holds every trained rank's activations for the backward pass: k ranks of
an L-block model keep k·L blocks' intermediates. With `train.remat=block` each block's forward
runs under `jax.checkpoint` with the policy `train.remat_policy` (a name in
`jax.checkpoint_policies`): only what the policy saves (nothing: just each block's input) is kept,
and the rest is recomputed in the backward pass.

The setting is a trace-time context, like `sharding.with_mesh`: the train step traces under
`rematerialised(policy)`, and a model's block loop runs `block(fn)(layer, ...)`. Evaluation and
generation trace outside it, so they pay nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import contextvars

from flax import nnx
import jax

MODES = ("none", "block")
# Policies that take no arguments (jax.checkpoint_policies): what a block keeps for backward.
POLICIES = (
  "nothing_saveable",
  "dots_saveable",
  "dots_with_no_batch_dims_saveable",
  "everything_saveable",
)
_POLICY: contextvars.ContextVar[str | None] = contextvars.ContextVar("remat_policy", default=None)


@contextlib.contextmanager
def rematerialised(policy: str | None) -> Iterator[None]:
  """Blocks traced inside run under jax.checkpoint with `policy` (None: as they are)."""
  if policy is not None and policy not in POLICIES:
    raise ValueError(f"remat policy {policy!r}: valid: {', '.join(POLICIES)}")
  token = _POLICY.set(policy)
  try:
    yield
  finally:
    _POLICY.reset(token)


def block(fn: Callable) -> Callable:
  """`fn(module, *arrays)` (one block's forward, which must not modify the module) recomputed
  in the backward pass under the policy in context; `fn` itself outside one.

  The module goes in as its split state, through plain `jax.checkpoint`: the step may already
  be inside a `jax.vmap` over ranks, where an nnx transform could not update the module."""
  policy = _POLICY.get()
  if policy is None:
    return fn

  def run(module: nnx.Module, *args):
    graphdef, state = nnx.split(module)
    pure = lambda state, *args: fn(nnx.merge(graphdef, state), *args)
    checkpointed = jax.checkpoint(
      pure, policy=getattr(jax.checkpoint_policies, policy), prevent_cse=True
    )
    return checkpointed(state, *args)

  return run
