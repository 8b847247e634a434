"""Training methods: what each step trains, its loss, and how it logs and is evaluated.

  MultiRank  NSN: the task loss at several ranks (fixed or drawn), vmapped and combined by the
             objective (learned log-variances by default); `nsn_jax.objective`.
  Distill    FlexRank consolidation: KL to the frozen dense teacher at one sampled nested
             profile per step; `nsn_jax.profiles`.
  Dense      the baseline twin (`model.dense`): the plain task loss, no ranks.

Each is a small frozen object the trainer drives without knowing which it has: `step_inputs(step)`
is the per-step data the jitted step receives (so one program serves every draw), `loss` runs
inside it, `log` turns fetched metrics into scalars, `eval_points` names what evaluation runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nsn_jax import config as config_lib
from nsn_jax import profiles, sharding
from nsn_jax.checkpoint import CheckpointError
from nsn_jax.config import DISTILL
from nsn_jax.layers import Rank
from nsn_jax.objective import Objective, distillation_loss, multi_rank_loss
from nsn_jax.ranks import (
  BucketPlan,
  RankSource,
  bucket_price,
  held_out_ranks,
  rank_source_from_config,
)
from nsn_jax.tasks import Task

Scalars = dict[str, float]


@dataclasses.dataclass(frozen=True)
class Method:
  """The parts every method shares: the task and the FlexRank profiles searched at start."""

  task: Task
  found: tuple[profiles.Profile, ...] = ()

  def extra(self, mesh: jax.sharding.Mesh, config) -> tuple[Any, Any]:
    """(value, sharding) of what the step needs beside the state; (None, None) by default."""
    del mesh, config
    return None, None

  def start_line(self) -> str | None:
    """What the trainer logs once at start about how the step runs, or None."""
    return None

  def eval_points(self) -> dict[str, Rank]:
    """{name: rank or profile} evaluated during training, each its own compiled program."""
    return {f"profile_{budget:g}": p for budget, p in profiles.by_budget(self.found).items()}

  def metadata(self) -> dict:
    """What a checkpoint records about the method (trained / held-out ranks, profiles)."""
    return self._flexrank_record((), trained=False) if self.found else {}

  def _flexrank_record(self, probabilities, trained: bool) -> dict:
    """The profiles as saved: `eval.py --profiles` and the export read them back."""
    return {
      "flexrank": {
        "profiles": [p.to_json() for p in self.found],
        "probabilities": list(probabilities),
        "trained": trained,
      }
    }

  def check_resume(self, metadata: Mapping, directory: str) -> None:
    """Refuses to resume when the profiles searched now differ from those the checkpoint
    trained with: a resumed run must go on training the same profiles."""
    saved = metadata.get("flexrank", {}).get("profiles", [])
    if profiles.by_budget(saved) != profiles.by_budget(self.found):
      raise CheckpointError(
        f"the FlexRank profiles searched now differ from those the checkpoint in {directory} "
        "was trained with. Resume with the same flexrank.budgets, surgery and "
        "model.init_from (whose run must not have trained further), or use a new workdir."
      )


@dataclasses.dataclass(frozen=True)
class MultiRank(Method):
  """NSN's multi-rank training. `plan`: how the fixed set runs (`train.multi_rank=bucketed`, or
  `loop_static`: one rank per bucket), static; None: ranks are data (`vmap_masked`)."""

  objective: Objective = Objective()
  source: RankSource | None = None
  plan: BucketPlan | None = None
  eval_ranks: tuple[int, ...] = ()

  def step_inputs(self, step: int) -> np.ndarray:
    """int32 (k,): the ranks step `step` (1-based) trains."""
    return self.source(step - 1)

  def loss(self, state, batch: dict, ranks: jax.Array, extra: Any):
    del extra
    return multi_rank_loss(
      state.model,
      state.rank_weights,
      self.objective,
      self.task,
      batch,
      ranks if self.plan is None else self.plan,
    )

  def start_line(self) -> str | None:
    return None if self.plan is None else self.plan.describe(self.source.max_rank)

  def log(self, step: int, ranks: np.ndarray, metrics: Mapping) -> tuple[Scalars, Scalars]:
    """(scalars, progress-line fields) from a step's fetched metrics."""
    scalars = {"train/total_loss": float(metrics["total_loss"])}
    for i, r in enumerate(ranks):
      for name in ("loss", "accuracy", "log_var"):
        scalars[f"train/rank_{r}/{name}"] = float(metrics[name][i])
    anchor = int(np.argmax(ranks))  # the objective can go negative (it includes Σ s_r): show CE
    return scalars, {
      f"ce@{ranks[anchor]}": float(metrics["loss"][anchor]),
      f"acc@{ranks[anchor]}": float(metrics["accuracy"][anchor]),
    }

  def eval_points(self) -> dict[str, Rank]:
    return {f"rank_{r}": int(r) for r in self.eval_ranks} | super().eval_points()

  def metadata(self) -> dict:
    return {
      "trained_ranks": list(self.source.trained_ranks()),
      "held_out_ranks": list(held_out_ranks(self.source)),
      **super().metadata(),
    }


@dataclasses.dataclass(frozen=True)
class Distill(Method):
  """FlexRank's consolidation: one profile per step, drawn by `sampler`, distilled from the
  dense `teacher` (an argument of the step, not a constant baked into the program)."""

  sampler: profiles.ProfileSampler | None = None
  teacher: nnx.Module | None = None

  def step_inputs(self, step: int) -> np.ndarray:
    """int32 (L,): the per-layer ranks of the profile step `step` (1-based) trains."""
    return self.sampler(step - 1)

  def extra(self, mesh: jax.sharding.Mesh, config) -> tuple[Any, Any]:
    """The teacher's state on `mesh`, as fresh buffers: the layers the surgery kept are the very
    buffers of the student's state, which each step donates."""
    state = nnx.state(self.teacher)
    layout = sharding.config_shardings(state, mesh, config.sharding)
    copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=layout)
    return copy(jax.device_put(state, layout)), layout

  def loss(self, state, batch: dict, ranks: jax.Array, teacher_state: Any):
    teacher = nnx.merge(nnx.graphdef(self.teacher), teacher_state)
    return distillation_loss(state.model, teacher, self.task, batch, self.sampler.profile(ranks))

  def log(self, step: int, ranks: np.ndarray, metrics: Mapping) -> tuple[Scalars, Scalars]:
    del ranks
    budget = self.sampler.budgets[self.sampler.index(step - 1)]
    scalars = {
      "train/total_loss": float(metrics["total_loss"]),
      "train/budget": budget,
      **{f"train/{k}": float(metrics[k]) for k in ("kl", "loss", "accuracy")},
    }
    return scalars, {
      f"kl@{budget:g}": float(metrics["kl"]),
      f"ce@{budget:g}": float(metrics["loss"]),
    }

  def metadata(self) -> dict:
    return {
      "trained_ranks": [],
      "held_out_ranks": list(range(1, self.sampler.max_rank + 1)),
      **self._flexrank_record(self.sampler.probabilities, trained=True),
    }


@dataclasses.dataclass(frozen=True)
class Dense(Method):
  """The dense baseline: mean cross-entropy of the model itself, no ranks."""

  def step_inputs(self, step: int) -> np.ndarray:
    del step
    return np.zeros((0,), np.int32)  # nothing varies per step

  def loss(self, state, batch: dict, ranks: jax.Array, extra: Any):
    del ranks, extra
    scores = self.task.rank_scores(state.model, batch, None)
    loss = scores["loss"] / scores["weight"]
    return loss, {"loss": loss, "accuracy": scores["correct"] / scores["weight"]}

  def log(self, step: int, ranks: np.ndarray, metrics: Mapping) -> tuple[Scalars, Scalars]:
    del step, ranks
    scalars = {f"train/{k}": float(metrics[k]) for k in ("total_loss", "loss", "accuracy")}
    return scalars, {"ce": scalars["train/loss"], "acc": scalars["train/accuracy"]}

  def eval_points(self) -> dict[str, Rank]:
    return {"dense": None}

  def metadata(self) -> dict:
    return {"trained_ranks": [], "held_out_ranks": []}


def build_method(
  config: ml_collections.ConfigDict,
  task: Task,
  max_rank: int | None,
  found: Sequence[profiles.Profile] = (),
  teacher: nnx.Module | None = None,
) -> Method:
  """The method a validated config names: Dense (`model.dense`), Distill (objective
  flexrank_distill, with `found` profiles and the `teacher`) or MultiRank."""
  found = tuple(found)
  if config.model.dense:
    return Dense(task)
  if config.objective.name == DISTILL:
    sampler = profiles.ProfileSampler.create(
      found, config.flexrank.probabilities, config.seed, max_rank
    )
    return Distill(task, found, sampler, teacher)
  source = rank_source_from_config(config)
  plans = {
    "loop_static": BucketPlan.singletons,
    "bucketed": lambda ranks: BucketPlan.auto(ranks, bucket_price(jax.default_backend())),
  }
  mode = config_lib.multi_rank(config)
  plan = plans[mode](source.ranks) if mode in plans else None  # validated: fixed ranks
  objective = Objective.named(
    config.objective.name, config.objective.logits_weight, config.objective.ortho_weight
  )
  return MultiRank(task, found, objective, source, plan, config_lib.eval_ranks(config))
