"""FlexRank through train.py, eval.py and export: profiles saved in the checkpoint, distillation
from the dense model, profile evaluation and export at a profile.

The tiny random-weight GGUF of tests/test_llm_train.py stands in for SmolLM2, on the real offline
Shakespeare genre data, with the shipped config at its `flexrank,smoke` size.
"""

import json
import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_llm_train import _config, _svd_smoke

from configs import smollm2_genre, smollm2_lm
from nsn_jax import config as config_lib
from nsn_jax import flops
from nsn_jax.build import build_pretrained, text_encoder
from nsn_jax.checkpoint import CheckpointError
from nsn_jax.data import pipeline
from nsn_jax.export import export
from nsn_jax.layers import nsn_layers
from nsn_jax.objective import distillation_loss
from nsn_jax.profiles import ProfileSampler, saved_profiles, search_profiles
from nsn_jax.restore import restore_dense_twin, restore_model
from nsn_jax.surgery import capture_inputs
from nsn_jax.sweep import run_sweep
from nsn_jax.tasks import get_task
from nsn_jax.train_lib import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = get_task("text_classification")


@pytest.fixture(scope="module")
def dense_twin(tiny_gguf, data_dir, tmp_path_factory):
  """The workdir of the genre `dense,smoke` run: the fine-tuned classifier FlexRank distils."""
  workdir = str(tmp_path_factory.mktemp("twin"))
  train_and_evaluate(_config(smollm2_genre, "dense,smoke", tiny_gguf, data_dir), workdir)
  return workdir


@pytest.fixture(scope="module")
def flex_run(tiny_gguf, data_dir, dense_twin, tmp_path_factory):
  """(workdir, final metrics) of the genre `flexrank,smoke` config started from the dense twin:
  budgets 0.55, 0.6, 0.65."""
  workdir = str(tmp_path_factory.mktemp("flex"))
  return workdir, train_and_evaluate(
    _config(smollm2_genre, "flexrank,smoke", tiny_gguf, data_dir, model__init_from=dense_twin),
    workdir,
  )


def _batch(config):
  """The first training batch of `config` (real Shakespeare passages), as jax arrays."""
  batches = pipeline.train_batches(
    config.data, config.train.batch_size, config.seed, encoder=text_encoder(config)
  )
  return {k: jnp.asarray(v) for k, v in batches[0].items()}


def _relative(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_profiles_in_metadata_are_nested_within_budget_and_reload(flex_run):
  workdir, final = flex_run
  model, metadata, _ = restore_model(workdir)
  seq_len = metadata["config"]["data"]["seq_len"]
  found = saved_profiles(metadata)
  assert sorted(found) == [0.55, 0.6, 0.65]
  dense = flops.dense_model_flops(model, seq_len)
  records = {p["budget"]: p for p in metadata["flexrank"]["profiles"]}
  for budget, profile in found.items():
    assert set(profile) == set(nsn_layers(model))
    cost = flops.model_flops(model, profile, seq_len)
    assert cost <= budget * dense
    assert records[budget]["flops_frac_dense"] == pytest.approx(cost / dense)
    assert np.isfinite(final[f"eval/profile_{budget:g}/loss"])
  budgets = sorted(found)
  for low, high in zip(budgets, budgets[1:]):
    assert all(found[low][path] <= found[high][path] for path in found[low])
  assert found[budgets[0]] != found[budgets[-1]]  # the budgets really differ in ranks
  # No global rank trained: the sweep's rank rows are all held out.
  assert metadata["flexrank"]["trained"] and metadata["trained_ranks"] == []


def test_parameter_budgets_give_nested_profiles_within_the_parameter_count(tiny_gguf, data_dir):
  config = _svd_smoke(
    tiny_gguf,
    data_dir,
  )
  dense, model, _ = build_pretrained(config, seed=config.seed)
  batch = _batch(config)
  calibration = capture_inputs(dense, lambda m: TASK.logits(m, batch, None))
  total = flops.total_params(dense)
  low, high = flops.active_params(model, 1) / total, flops.active_params(model, None) / total
  budgets = [low + (high - low) * t for t in (0.9, 0.3, 0.6)]  # any order
  found = search_profiles(model, dense, calibration, budgets, config.data.seq_len, "params")
  by_budget = {p.budget: p for p in found}
  assert [p.budget for p in found] == budgets
  for budget, p in by_budget.items():
    assert p.unit == "params"
    fraction = flops.active_params(model, p.ranks) / total
    assert fraction <= budget and p.params_frac_dense == pytest.approx(fraction)
    assert fraction > budget - 0.05 * (high - low)  # the DP spends the budget
  ordered = [by_budget[b].ranks for b in sorted(budgets)]
  for small, large in zip(ordered, ordered[1:]):
    assert all(small[path] <= large[path] for path in small)
  with pytest.raises(ValueError, match="below .* the fraction of the dense model's params"):
    search_profiles(model, dense, calibration, [low / 2], config.data.seq_len, "params")
  with pytest.raises(ValueError, match="budget_unit"):
    search_profiles(model, dense, calibration, budgets, config.data.seq_len, "bytes")


def test_distillation_logs_finite_kl_at_the_profiles_the_sampler_draws(flex_run):
  workdir, _ = flex_run
  metadata = restore_model(workdir)[1]
  sampler = ProfileSampler.create(
    metadata["flexrank"]["profiles"], (), metadata["config"]["seed"], metadata["max_rank"]
  )
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  train = [r for r in logged if "train/kl" in r]
  assert [r["step"] for r in train] == [2, 4, 6]
  for r in train:
    assert np.isfinite(r["train/kl"]) and r["train/kl"] >= 0
    assert r["train/budget"] == sampler.budgets[sampler.index(r["step"] - 1)]


def test_sampled_profile_sequence_replays_by_seed_and_step():
  found = [{"budget": b, "ranks": {"x": r, "y": r + 1}} for b, r in ((0.3, 1), (0.5, 2), (0.9, 4))]
  sampler = ProfileSampler.create(found, (0.2, 0.3, 0.5), seed=7, max_rank=8)
  again = ProfileSampler.create(found, (0.2, 0.3, 0.5), seed=7, max_rank=8)
  draws = [sampler.index(step) for step in range(3000)]
  # A resumed run asks for later steps only: each answer depends on (seed, step) alone.
  assert [again.index(step) for step in range(2999, -1, -1)] == draws[::-1]
  assert draws != [
    ProfileSampler.create(found, (0.2, 0.3, 0.5), 8, 8).index(s) for s in range(3000)
  ]
  np.testing.assert_allclose(np.bincount(draws) / 3000, (0.2, 0.3, 0.5), atol=0.03)
  np.testing.assert_array_equal(sampler(5), sampler.ranks[draws[5]])
  assert list(sampler.ranks[2]) == [4, 5] and sampler.paths == ("x", "y")
  with pytest.raises(ValueError, match="summing to 1"):
    ProfileSampler.create(found, (0.5, 0.5), seed=0, max_rank=8)


def test_kl_is_zero_for_the_teacher_and_full_rank_and_distillation_lowers_it(tiny_gguf, data_dir):
  # Full rank (R = 32 = d_model) with plain SVD: the student reproduces the dense teacher.
  config = _config(
    smollm2_genre, "smoke", tiny_gguf, data_dir, model__max_rank=32, surgery__init="svd"
  )
  dense, model, _ = build_pretrained(config, seed=config.seed)
  # A fresh head is zero (uniform predictions) and would make every KL 0: give teacher and
  # student the same random head, as a trained one would be.
  head = jax.random.normal(jax.random.key(0), dense.head.kernel.shape)
  dense.head.kernel[...], model.head.kernel[...] = head, head
  batch = _batch(config)
  paths = list(nsn_layers(model))
  at = lambda r: {path: jnp.asarray(r, jnp.int32) for path in paths}  # masked path, as training
  assert float(distillation_loss(dense, dense, TASK, batch, None)[0]) == 0.0
  kl_full = float(distillation_loss(model, dense, TASK, batch, at(32))[0])
  assert abs(kl_full) < 1e-6  # zero up to float32 rounding (it can land a hair below 0)
  kl_low, aux = distillation_loss(model, dense, TASK, batch, at(2))
  assert float(kl_low) > 100 * max(kl_full, 1e-9) and np.isfinite(float(aux["loss"]))

  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, dense, batch):
    loss, grads = nnx.value_and_grad(lambda m: distillation_loss(m, dense, TASK, batch, at(2))[0])(
      model
    )
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer, dense, batch)) for _ in range(8)]
  assert losses[0] == pytest.approx(float(kl_low), rel=1e-4) and losses[-1] < 0.7 * losses[0]


def test_eval_profiles_rows(flex_run, dense_twin):
  workdir, final = flex_run
  rows = run_sweep(workdir, "none", profiles=True, verbose=False)
  assert [r.model for r in rows] == ["flexrank"] * 3
  for r in rows:
    budget = r.budget
    assert r.rank is None and r.trained and r.flops_frac_dense <= budget
    assert r.accuracy == pytest.approx(final[f"eval/profile_{budget:g}/accuracy"])
    assert r.loss == pytest.approx(final[f"eval/profile_{budget:g}/loss"], rel=1e-5)
    assert r.flops <= r.xla_flops <= 1.2 * r.flops  # as test_llm_train's ranks
  both = run_sweep(workdir, "8", profiles=True, verbose=False)
  assert [r.model for r in both] == ["nsn", "flexrank", "flexrank", "flexrank"]
  assert not both[0].trained
  # A FlexRank run as a reference of another run: its distilled profiles, evaluated the same.
  beside = run_sweep(dense_twin, "none", references=[workdir], verbose=False)
  assert [r.model for r in beside] == [f"flexrank: {workdir}"] * 3
  assert [r.accuracy for r in beside] == [r.accuracy for r in rows]
  with pytest.raises(ValueError, match="nothing to evaluate"):
    run_sweep(workdir, "none", verbose=False)
  proc = subprocess.run(
    [sys.executable, "eval.py", f"--workdir={workdir}", "--ranks=none", "--profiles"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "flexrank profile" in proc.stdout and "(mean" in proc.stdout


def test_export_at_a_profile_reloads_smaller_and_reproduces_it(flex_run, tmp_path):
  workdir, _ = flex_run
  model, metadata, _ = restore_model(workdir)
  profile = saved_profiles(metadata)[0.6]
  out = str(tmp_path / "p60")
  info = export(workdir, out, profile_budget=0.6)["export"]
  reloaded = restore_model(out)[0]
  batch = _batch(config_lib.from_json(metadata["config"]))
  # Compare the backbone's hidden states, which the profile changes: under pure distillation
  # the classifier's fresh (zero) head never trains, so its logits are identically 0.
  hidden = lambda m, rank: m.backbone.encode(batch["tokens"], batch["mask"], rank)
  assert _relative(hidden(reloaded, None), hidden(model, profile)) <= 1e-5
  assert info["profile_budget"] == 0.6 and info["rank"] == dict(profile)
  assert info["params"] == flops.total_params(reloaded) < flops.total_params(model)
  seq_len = metadata["config"]["data"]["seq_len"]
  assert info["flops"] == seq_len * flops.model_flops(reloaded, None, seq_len)
  with pytest.raises(ValueError, match="profile_budget=0.4: no saved profile.*0.55, 0.6, 0.65"):
    export(workdir, str(tmp_path / "x"), profile_budget=0.4)


def test_an_nsn_run_saves_untrained_profiles_and_keeps_its_objective(tiny_gguf, data_dir, tmp_path):
  config = _config(
    smollm2_genre, "smoke", tiny_gguf, data_dir, train__steps=2, flexrank__budgets=(0.6,)
  )
  final = train_and_evaluate(config, str(tmp_path))
  assert {"eval/rank_8/loss", "eval/rank_2/loss", "eval/profile_0.6/loss"} <= set(final)
  metadata = restore_model(str(tmp_path))[1]
  assert not metadata["flexrank"]["trained"] and metadata["trained_ranks"] == [2, 8]
  with open(tmp_path / "metrics.jsonl") as f:
    assert any("train/rank_8/loss" in json.loads(line) for line in f)
  rows = run_sweep(str(tmp_path), "none", profiles=True, verbose=False)
  assert [(r.model, r.trained) for r in rows] == [("flexrank", False)]


def test_surgery_starts_from_the_dense_twin(tiny_gguf, data_dir, dense_twin):
  config = _svd_smoke(
    tiny_gguf,
    data_dir,
    model__max_rank=32,
    model__init_from=dense_twin,
  )  # full rank: d_model
  twin = restore_dense_twin(config)
  assert float(jnp.abs(twin.head.kernel[...]).max()) > 0  # fine-tuned, not a new zero head
  dense, model, _ = build_pretrained(
    config, seed=config.seed, calibrate=None, dense=restore_dense_twin(config)
  )
  batch = _batch(config)
  reference = TASK.logits(restore_model(dense_twin)[0], batch, None)
  assert _relative(TASK.logits(dense, batch, None), reference) == 0
  assert _relative(TASK.logits(model, batch, config.model.max_rank), reference) < 1e-4


def test_bad_flexrank_configs_are_refused(
  tiny_gguf, data_dir, smoke_config, dense_twin, flex_run, tmp_path
):
  def run(variant, name, **overrides):
    train_and_evaluate(
      _config(smollm2_genre, variant, tiny_gguf, data_dir, **overrides), str(tmp_path / name)
    )

  with pytest.raises(ValueError, match="flexrank.budgets.*flexrank_distill"):
    run("flexrank,smoke", "a", flexrank__budgets=())
  with pytest.raises(ValueError, match=r"\[0.3\] are below 0.50"):
    run("flexrank,smoke", "b", flexrank__budgets=(0.3, 0.6), model__init_from=dense_twin)
  with pytest.raises(ValueError, match="probabilities"):
    run("flexrank,smoke", "c", flexrank__probabilities=(0.5, 0.5), model__init_from=dense_twin)
  with pytest.raises(ValueError, match="repeated budget"):
    run("flexrank,smoke", "d", flexrank__budgets=(0.6, 0.6))
  with pytest.raises(CheckpointError, match="profiles searched now differ"):
    train_and_evaluate(
      _config(
        smollm2_genre,
        "flexrank,smoke",
        tiny_gguf,
        data_dir,
        model__init_from=dense_twin,
        flexrank__budgets=(0.55, 0.6),
      ),
      flex_run[0],
    )
  with pytest.raises(ValueError, match="init_from.*classifier needs a fine-tuned teacher"):
    run("flexrank,smoke", "f")
  with pytest.raises(ValueError, match="nested run.*dense twin"):
    run("flexrank,smoke", "g", model__init_from=flex_run[0])
  with pytest.raises(ValueError, match="another task, data.name, data.num_classes"):
    train_and_evaluate(
      _config(smollm2_lm, "smoke", tiny_gguf, data_dir, model__init_from=dense_twin),
      str(tmp_path / "h"),
    )
  with pytest.raises(ValueError, match="model.init_from=.*nowhere': not found"):
    run("smoke", "i", model__init_from=str(tmp_path / "nowhere"))
  with pytest.raises(CheckpointError, match="no checkpoint in"):
    run("smoke", "k", model__init_from=str(tmp_path))  # exists, holds no checkpoint
  smoke_config.flexrank.budgets = (0.5,)
  with pytest.raises(ValueError, match="unless a model gets surgery"):
    train_and_evaluate(smoke_config, str(tmp_path / "e"))
  smoke_config.flexrank.budgets, smoke_config.model.init_from = (), dense_twin
  with pytest.raises(ValueError, match="model.init_from=.*another model.name, task"):
    train_and_evaluate(smoke_config, str(tmp_path / "j"))
