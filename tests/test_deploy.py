"""Deployment forms (dense / factorised / GAR), the per-layer choice, the exported checkpoint."""

import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsn_jax import flops
from nsn_jax.deploy import FORM_CLASSES, FORMS, deploy
from nsn_jax.export import export
from nsn_jax.layers import NSNDense, apply
from nsn_jax.models.mlp import NSNMLP
from nsn_jax.restore import restore_model
from nsn_jax.train_lib import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Wrapper(nnx.Module):
  """One NSN layer at path "layer", reached through the model's rank argument."""

  def __init__(self, layer):
    self.layer = layer

  def __call__(self, x, rank=None):
    return apply(self.layer, x, rank=rank)


def _relative(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("d_in,d_out", [(24, 16), (16, 24)])
def test_every_form_reproduces_the_layer_at_every_rank(d_in, d_out):
  model = Wrapper(NSNDense(d_in, d_out, 16, rngs=nnx.Rngs(0)))
  model.layer.bias[...] = jnp.linspace(-1, 1, d_out)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((5, d_in)), jnp.float32)
  for rank in range(1, 17):
    expected = model(x, rank)
    for form in FORMS:
      deployed, (entry,) = deploy(model, rank, form)
      assert entry.form == form and entry.rank == rank
      assert _relative(deployed(x), expected) < 1e-4, (form, rank)


@pytest.mark.parametrize("use_bias", [True, False])
def test_each_form_reports_the_cost_flops_gives_it(use_bias):
  d_in, d_out = 24, 16
  model = Wrapper(NSNDense(d_in, d_out, 16, use_bias=use_bias, rngs=nnx.Rngs(0)))
  for rank in (1, 7, 16):
    for form in FORMS:
      expected = flops.form_flops(form, d_in, d_out, rank, use_bias)
      deployed, (entry,) = deploy(model, rank, form)
      assert deployed.layer.flops_per_row() == entry.flops == expected, (form, rank)
      assert flops.model_flops(deployed) == expected  # counted once, through flops_per_row
      assert FORM_CLASSES[form](d_in, d_out, rank, use_bias).flops_per_row() == expected


def test_cheapest_form_never_costs_more_than_dense_and_shrinks_parameters():
  d_in, d_out, max_rank = 40, 24, 24
  model = Wrapper(NSNDense(d_in, d_out, max_rank, rngs=nnx.Rngs(1)))
  dense = flops.dense_flops(d_in, d_out)
  forms = set()
  for rank in range(1, max_rank + 1):
    deployed, (entry,) = deploy(model, rank)
    forms.add(entry.form)
    assert entry.flops == flops.model_flops(deployed)
    assert entry.flops <= min(dense, flops.nsn_layer_flops(model.layer, rank))
    assert (entry.flops < dense) == (rank < min(d_in, d_out))  # GAR beats dense below min(d)
    assert flops.dense_model_flops(deployed) == dense
    assert flops.total_params(deployed) < flops.total_params(model)
  assert forms == {"gar", "dense"}  # GAR below min(d_in, d_out), folded dense at it


def test_matmul_policy_switches_from_factorised_to_dense_at_the_break_even_rank():
  d_in, d_out, max_rank = 40, 24, 24  # break-even r* = 40·24/64 = 15
  model = Wrapper(NSNDense(d_in, d_out, max_rank, rngs=nnx.Rngs(1)))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((5, d_in)), jnp.float32)
  for rank in range(1, max_rank + 1):
    deployed, (entry,) = deploy(model, rank, "matmul")
    assert entry.form == ("factorised" if rank < 15 else "dense"), rank  # r* itself: a tie
    assert entry.flops <= min(
      flops.dense_flops(d_in, d_out), flops.nsn_layer_flops(model.layer, rank)
    )
    assert _relative(deployed(x), model(x, rank)) < 1e-4, rank


def test_profile_deploys_each_layer_at_its_own_rank_and_leaves_the_model_untouched():
  model = NSNMLP(12, (10, 8), 3, max_rank=8, rngs=nnx.Rngs(2))
  before = nnx.to_pure_dict(nnx.state(model))
  profile = {"hidden/0": 2, "hidden/1": 8}  # 8 = min(d_in, d_out): GAR ties dense, dense wins
  deployed, report = deploy(model, profile, form={"hidden/0": "factorised"})
  assert [(e.path, e.rank, e.form) for e in report] == [
    ("hidden/0", 2, "factorised"),
    ("hidden/1", 8, "dense"),
  ]
  x = jnp.asarray(np.random.default_rng(1).random((4, 12)), jnp.float32)
  assert _relative(deployed(x), model(x, rank=profile)) < 1e-5
  after = nnx.to_pure_dict(nnx.state(model))
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), before, after))


def test_bad_ranks_and_forms_are_refused_with_the_layer_named():
  model = NSNMLP(12, (10,), 3, max_rank=6, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"hidden/0.*R=6.*rank 7"):
    deploy(model, 7)
  with pytest.raises(ValueError, match="no entry for NSN layer 'hidden/0'"):
    deploy(model, {"hidden/9": 2})
  with pytest.raises(ValueError, match="form policy"):
    deploy(model, 2, "folded")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
  """A smoke run whose hidden layer (784 → 16, R = 16) reaches its break-even rank (15.7)."""
  from configs import default

  config = default.get_config("smoke")
  config.data.data_dir = data_dir
  config.model.hidden, config.model.max_rank = (16,), 16
  config.ranks.fixed = (16, 8, 2)
  config.eval.ranks = (16,)
  workdir = tmp_path_factory.mktemp("deploy")
  train_and_evaluate(config, str(workdir))
  return str(workdir)


@pytest.mark.parametrize(
  "rank,form,fmt", [(4, "gar", "orbax"), (16, "dense", "orbax"), (4, "gar", "safetensors")]
)
def test_export_reloads_smaller_and_reproduces_the_rank(trained, tmp_path, rank, form, fmt):
  model, _, step = restore_model(trained)
  out = str(tmp_path / f"r{rank}")
  metadata = export(trained, out, rank=rank, fmt=fmt)
  reloaded, saved, saved_step = restore_model(out)
  assert saved_step == step and [e["form"] for e in saved["deployed"]] == [form]
  x = jnp.asarray(np.random.default_rng(0).random((8, 28, 28, 1)), jnp.float32)
  assert _relative(reloaded(x), model(x, rank=rank)) < 1e-5
  info = metadata["export"]
  assert info["params"] == flops.total_params(reloaded) < flops.total_params(model)
  assert info["flops"] == flops.model_flops(reloaded) <= flops.model_flops(model, rank)


def test_export_by_budget_and_refusals(trained, tmp_path):
  model = restore_model(os.path.join(trained, "checkpoints"))[0]
  metadata = export(trained, str(tmp_path / "half"), budget=0.5)
  assert metadata["export"]["rank"] == flops.rank_for_budget(model, 0.5)
  existing = tmp_path / "half"
  listing = sorted(os.listdir(existing))
  with pytest.raises(ValueError, match="already exists"):
    export(trained, str(existing), rank=2)
  assert sorted(os.listdir(existing)) == listing  # nothing overwritten
  with pytest.raises(ValueError, match="at most one"):
    export(trained, str(tmp_path / "x"), rank=2, budget=0.5)
  with pytest.raises(ValueError, match="exactly one of --rank .* for a nested run"):
    export(trained, str(tmp_path / "x"))
  with pytest.raises(ValueError, match="--format=hf writes decoders"):
    export(trained, str(tmp_path / "x"), rank=2, form="dense", fmt="hf")
  with pytest.raises(ValueError, match="--format=hf needs --form=dense"):
    export(trained, str(tmp_path / "x"), rank=2, fmt="hf")
  assert not (tmp_path / "x").exists() and sorted(os.listdir(tmp_path)) == ["half"]


def test_export_cli(trained, tmp_path):
  out = tmp_path / "cli"
  proc = subprocess.run(
    [sys.executable, "-m", "nsn_jax.export", f"--workdir={trained}", "--rank=3", f"--out={out}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "hidden/0" in proc.stdout and "exported rank 3" in proc.stdout
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "nsn_jax.export",
      f"--workdir={trained}",
      "--rank=17",
      f"--out={tmp_path / 'bad'}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  # Bad input: one line `tool: error: message` and exit code 2 (`nsn_jax.cli`).
  assert proc.returncode == 2 and "export.py: error: " in proc.stderr and "rank 17" in proc.stderr
  assert "Traceback" not in proc.stderr and not (tmp_path / "bad").exists()
