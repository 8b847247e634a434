"""Ranks for any Flax NNX model: models written as Flax's examples write them (no rank argument,
plain nnx.Linear / nnx.MultiHeadAttention) run at static, traced and per-layer ranks after
surgery, and train.py / eval.py train and sweep one given by import path."""

import json
import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import custom_mlp
from examples.user_models import MLP, PatchTransformer
import nsn_jax as nsn
from nsn_jax import build, objective
from nsn_jax import config as config_lib
from nsn_jax.config import ConfigError
from nsn_jax.evaluate import RankEvaluator
from nsn_jax.ranks import BucketPlan
from nsn_jax.tasks import get_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))


def _models():
  """A Flax-style MLP and transformer after surgery at R = 12 (below their widths, 24 and 16)."""
  mlp = MLP(64, 24, 5, rngs=nnx.Rngs(0))
  vit = PatchTransformer(4, 1, 16, 2, 32, 2, 5, rngs=nnx.Rngs(0))
  return [
    nsn.decompose_and_replace(mlp, r"^linear[12]$", max_rank=12)[0],
    nsn.decompose_and_replace(vit, r"/mlp/fc[12]$", max_rank=12)[0],
  ]


@pytest.mark.parametrize("index", [0, 1], ids=["mlp", "transformer"])
def test_static_traced_and_profile_ranks_agree_on_a_model_that_knows_nothing_of_ranks(index):
  model = _models()[index]
  full = model(IMAGES)  # no scope: every NSN layer at R
  np.testing.assert_allclose(full, nsn.apply(model, IMAGES, rank=12), atol=1e-6)
  for rank in (1, 5, 12):
    static = nsn.apply(model, IMAGES, rank=rank)
    traced = jax.jit(lambda x, r: nsn.apply(model, x, rank=r))(IMAGES, jnp.int32(rank))
    profile = nsn.apply(model, IMAGES, rank=dict.fromkeys(nsn.nsn_layers(model), rank))
    np.testing.assert_allclose(traced, static, atol=1e-5)
    np.testing.assert_allclose(profile, static, atol=1e-5)
  assert not np.allclose(nsn.apply(model, IMAGES, rank=1), full, atol=1e-3)


def test_each_static_rank_is_its_own_program_with_fewer_flops():
  model = _models()[0]
  graphdef, state = nnx.split(model)

  @jax.jit(static_argnums=2)
  def forward(state, x, rank):
    with nsn.at_rank(rank):  # set inside the traced function: the rank is in the jit key
      return nnx.merge(graphdef, state)(x)

  flops = {r: forward.lower(state, IMAGES, r).compile().cost_analysis()["flops"] for r in (2, 12)}
  assert flops[2] < 0.5 * flops[12]
  np.testing.assert_allclose(forward(state, IMAGES, 2), nsn.apply(model, IMAGES, rank=2))
  np.testing.assert_allclose(forward(state, IMAGES, 12), model(IMAGES), atol=1e-6)


def test_scopes_nest_and_a_layers_own_rank_wins():
  model = _models()[0]
  layer = model.linear1
  x = jnp.ones((2, 64))
  with nsn.at_rank(3):
    with nsn.at_rank(None):  # None keeps the enclosing scope
      assert nsn.current_rank() == 3
    with nsn.at_rank(7):
      np.testing.assert_allclose(layer(x), layer(x, rank=7))
    np.testing.assert_allclose(layer(x), layer(x, rank=3))
  assert nsn.current_rank() is None
  np.testing.assert_allclose(layer(x), layer(x, rank=12))  # outside any scope: R
  with pytest.raises(ValueError, match="valid ranks are 1..12"):
    nsn.apply(model, IMAGES, rank=13)


def test_the_vmapped_multi_rank_logits_of_a_custom_model_equal_each_rank_alone():
  model = _models()[1]
  task, batch = get_task("image_classification"), {"image": IMAGES}
  ranks = (12, 6, 3, 1)
  expected = jnp.stack([nsn.apply(model, IMAGES, rank=r) for r in ranks])
  masked = objective.per_rank_logits(model, task, batch, jnp.array(ranks, jnp.int32))
  bucketed = objective.per_rank_logits(model, task, batch, BucketPlan.auto(ranks))
  np.testing.assert_allclose(masked, expected, atol=1e-5)
  np.testing.assert_allclose(bucketed, expected, atol=1e-5)


@pytest.mark.parametrize(
  "override,field,match",
  [
    ({"factory": "examples.user_models"}, "model.factory", "package.module:callable"),
    ({"factory": "examples.nowhere:MLP"}, "model.factory", "ModuleNotFoundError"),
    ({"factory": "examples.user_models:Nothing"}, "model.factory", "AttributeError"),
    ({"kwargs": {"din": 100, "dmid": 8, "dout": 10}}, "model.factory", "it raised TypeError"),
    ({"kwargs": {"din": 784, "dmidd": 8, "dout": 10}}, "model.kwargs", "unexpected keyword"),
    ({"kwargs": {"din": 784, "dmid": 8, "dout": 7}}, "model.factory", r"returned \(2, 7\)"),
    ({"path": "/tmp"}, "model.path", "model.kwargs carry"),
    ({"dtype": "bfloat16"}, "model.dtype", "the factory picks its dtypes"),
  ],
)
def test_a_bad_custom_model_is_one_config_error_naming_the_field(override, field, match):
  config = custom_mlp.get_config("smoke")
  for key, value in override.items():
    config.model[key] = value
  with pytest.raises(ConfigError, match=match) as raised:
    nsn.validate(config)
    build.check_model_fits(config)
  assert raised.value.field == field and "\n" not in str(raised.value)


def test_rules_matching_no_layer_of_a_custom_model_list_its_layers():
  config = custom_mlp.get_config("smoke")
  config.surgery.rules = ("mlp",)
  with pytest.raises(ConfigError, match="linear1, linear2, linear3"):
    build.check_model_fits(config)


def test_kwargs_survive_the_saved_config_with_tuples_and_nested_values():
  config = custom_mlp.get_config("smoke")
  config.model.kwargs.extra = {"sizes": (3, (4, 5))}
  restored = config_lib.from_json(json.loads(config.to_json()))
  assert restored.model.kwargs.extra.sizes == (3, (4, 5))
  assert build.mismatches(config, restored) == []


def test_a_scope_open_around_a_library_entry_point_is_its_rank_not_a_cached_none():
  """RankEvaluator keys its programs by rank: rank None inside a scope is that scope's rank."""
  model = _models()[0]
  graphdef, params = nnx.split(model)
  task = get_task("image_classification")
  evaluator = RankEvaluator(graphdef, 4, task)
  arrays = {"image": np.asarray(IMAGES), "label": np.zeros(4, np.int32)}
  with nsn.at_rank(1):
    scoped = evaluator(params, arrays, None)["loss"]
  assert scoped == evaluator(params, arrays, 1)["loss"]
  assert evaluator(params, arrays, None)["loss"] == evaluator(params, arrays, 12)["loss"]
  assert scoped != evaluator(params, arrays, 12)["loss"]


def test_factory_fields_are_refused_for_the_built_in_models():
  config = nsn.defaults()
  config.model.factory = "examples.user_models:MLP"
  with pytest.raises(ConfigError, match="unless model.name=custom"):
    nsn.validate(config)


def test_train_py_trains_and_eval_py_sweeps_a_custom_model_by_import_path(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  # From another directory, as a user runs it: their package is found on PYTHONPATH.
  env = {**os.environ, "PYTHONPATH": REPO}

  def run(script, *flags):
    argv = [sys.executable, os.path.join(REPO, script), *flags]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

  config = f"{REPO}/configs/custom_mlp.py:smoke"
  run(
    "train.py", f"--config={config}", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}"
  )
  run("eval.py", f"--workdir={workdir}", "--ranks=1,4,8")
  with open(f"{workdir}/eval/step_20/sweep.json") as f:
    rows = json.load(f)
  assert [row["rank"] for row in rows] == [1, 4, 8]
  assert rows[0]["flops"] < rows[-1]["flops"]
  restored = nsn.restore_model(workdir)
  assert sorted(nsn.nsn_layers(restored.model)) == ["linear1", "linear2"]
  assert restored.model.linear1.max_rank == 8
  assert restored.config.model.kwargs.to_dict() == {"din": 784, "dmid": 32, "dout": 10}


def test_the_server_classifies_with_a_custom_model(tmp_path, data_dir):
  """The classifier engine shapes image requests as the dataset's images, so a user's model
  (here the Flax-style MLP after surgery) serves as the built-in one does."""
  from nsn_jax.serve.classify import Classifier
  from nsn_jax.train_lib import train_and_evaluate

  config = custom_mlp.get_config("smoke")
  config.data.data_dir, config.train.steps = data_dir, 4
  train_and_evaluate(config, str(tmp_path / "run"))
  restored = nsn.restore_model(str(tmp_path / "run"))
  engine = Classifier(restored, (4,), (1,))
  pixels = np.random.default_rng(0).integers(0, 256, (28, 28)).tolist()
  results, _ = engine.run(4, 1, [engine.parse({"inputs": [pixels]}, 4)])
  image = np.asarray(pixels, np.float32).reshape(1, 28, 28, 1) / 255.0
  expected = jax.nn.softmax(nsn.apply(restored.model, jnp.asarray(image), rank=4))
  np.testing.assert_allclose(results[0]["probabilities"], expected, rtol=1e-5, atol=1e-6)
