"""A pretrained decoder on a mesh: its weights load straight into their sharded layout, surgery
keeps them there (no device ever holds the whole model), and every mesh, with and without
remat, trains the losses of one device."""

from __future__ import annotations

import pathlib
import re
import shutil

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_hf_decoder import write_char_tokenizer

from benchmarks import sharded_load
from benchmarks import sharded_step as sharding_ops
from configs import smollm2_lm
from nsn_jax import sharding
from nsn_jax.build import build_pretrained, text_encoder
from nsn_jax.data import pipeline
from nsn_jax.llm import load_pretrained
from nsn_jax.methods import build_method
from nsn_jax.tasks import config_task
from nsn_jax.train_step import config_train_step, create_train_state

LLAMA = pathlib.Path(__file__).parent / "fixtures" / "hf" / "llama"


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> pathlib.Path:
  """The llama fixture with a tokenizer, which the language-modelling data needs."""
  directory = tmp_path_factory.mktemp("hf") / "llama"
  shutil.copytree(LLAMA, directory)
  write_char_tokenizer(directory)
  return directory


def _config(path, data_dir):
  config = smollm2_lm.get_config("smoke")
  config.model.name, config.model.path, config.data.data_dir = "hf_decoder", str(path), data_dir
  config.model.max_rank, config.ranks.fixed, config.eval.ranks = 16, (16, 4), (16, 4)
  config.surgery.init = "svd"
  config.sharding.min_size = 0  # the fixture's layers are all small: split them anyway
  return config


def _mesh(spec="fsdp=8"):
  return sharding.make_mesh(sharding.parse_mesh(spec))


def _leaves(module) -> dict[str, jax.Array]:
  return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(module))}


def test_each_tensor_lands_in_its_layout_with_the_same_values(llama, data_dir):
  config = _config(llama, data_dir)
  layout = sharding.config_layout(_mesh("fsdp=2,tensor=4"), config.sharding, "model/")
  _, sharded, _ = load_pretrained(LLAMA, layout=layout)
  _, plain, _ = load_pretrained(LLAMA)
  plain = _leaves(plain)
  split = 0
  for path, array in _leaves(sharded).items():
    assert array.sharding == layout(path, array.shape), path
    np.testing.assert_array_equal(np.asarray(array), np.asarray(plain[path]))
    split += not array.sharding.is_fully_replicated
  assert split >= 10  # every kernel and the embedding, not only a few


def test_surgery_factors_land_in_their_layout_and_match_the_one_device_surgery(llama, data_dir):
  config = _config(llama, data_dir)
  mesh = _mesh()
  _, model, _ = build_pretrained(config, seed=0, mesh=mesh)
  _, reference, _ = build_pretrained(config, seed=0)
  layout = sharding.config_layout(mesh, config.sharding, "model/")
  reference = _leaves(reference)
  for path, array in _leaves(model).items():
    assert array.sharding == layout(path, array.shape), path
    np.testing.assert_allclose(np.asarray(array), np.asarray(reference[path]), atol=1e-5)
  a = _leaves(model)["layers/0/mlp/up/a"]
  assert a.sharding.spec[0] is not None  # split on its input features, not replicated


def test_peak_device_memory_while_loading_stays_below_the_whole_model(llama, data_dir, tmp_path):
  """train.py's own path (load, surgery, method, train state) on 8 devices peaks below the dense
  model's bytes on every device; on one device (the control the sampler must catch) it peaks
  above. SVD surgery: the fixture is so small that activation-aware calibration's activations
  would outweigh its weights (docs/tpu.md measures SmolLM2 with calibration)."""
  config = "configs/smollm2_lm.py:smoke"
  argv = ["--config", config, "--model_path", str(llama), "--data_dir", data_dir]
  argv += ["--set", "model.name='hf_decoder'", "--set", "surgery.init='svd'", "--min_size", "0"]
  argv += ["--meshes", "fsdp=8;data=1", "--out", str(tmp_path / "load.json")]
  sharded, control = sharded_load.main(argv)["rows"]
  assert sharded["devices"] == 8 and control["devices"] == 1
  assert sharded["peak_over_model"] < 0.75, sharded
  assert control["peak_over_model"] > 1.0, control


def _train_step(config, mesh_spec: str):
  """(jitted multi-rank step, state, method, batch for step i) of `config` on `mesh_spec`."""
  mesh = _mesh(mesh_spec)
  graphdef, state, state_sharding = create_train_state(config, mesh)
  method = build_method(config, config_task(config), config.model.max_rank)
  placed = sharding.batch_sharding(mesh)
  step = config_train_step(config, graphdef, method.loss, state_sharding, placed)
  batches = pipeline.train_batches(config.data, 8, 0, encoder=text_encoder(config))
  batch = lambda i: {k: jax.device_put(v, placed) for k, v in batches[i].items()}
  return step, state, method, batch


def _losses(config, mesh_spec: str, steps: int = 20) -> np.ndarray:
  """The multi-rank LM step's total loss over `steps` steps on `mesh_spec`."""
  step, state, method, batch = _train_step(config, mesh_spec)
  losses = []
  for i in range(steps):
    state, metrics = step(state, batch(i), jnp.asarray(method.step_inputs(i)), None)
    losses.append(float(metrics["total_loss"]))
  return np.asarray(losses)


def _step_config(llama, data_dir, remat: str = "none"):
  config = _config(llama, data_dir)
  config.train.loss_chunk = 4  # several chunks of the 15 scored positions
  config.train.remat = remat
  return config


@pytest.fixture(scope="module")
def one_device_losses(llama, data_dir) -> np.ndarray:
  return _losses(_step_config(llama, data_dir), "data=1")


slow = pytest.mark.slow  # the whole matrix: make test-slow
CASES = [
  ("fsdp=2,tensor=4", "block"),
  pytest.param("fsdp=2,tensor=4", "none", marks=slow),
  pytest.param("data=1", "block", marks=slow),
  *(
    pytest.param(mesh, remat, marks=slow)
    for mesh in ("data=8", "fsdp=8", "tensor=8")
    for remat in ("none", "block")
  ),
]


@pytest.mark.parametrize("mesh, remat", CASES)
def test_meshes_and_remat_train_the_same_losses_as_one_device(
  llama, data_dir, one_device_losses, mesh, remat
):
  """20 steps of the decoder's bucketed multi-rank step with the chunked loss on data, fsdp,
  tensor and fsdp × tensor meshes, block remat on and off, give one device's losses to 1e-4
  relative (sharded sums add in another order; Adam carries the rounding forward)."""
  losses = _losses(_step_config(llama, data_dir, remat), mesh)
  np.testing.assert_allclose(losses, one_device_losses, rtol=1e-4)


def _collectives(config, mesh_spec: str) -> list[tuple[str, str]]:
  """(result shape, op) of every collective in the compiled multi-rank step."""
  step, state, method, batch = _train_step(config, mesh_spec)
  text = step.lower(state, batch(0), jnp.asarray(method.step_inputs(1)), None).compile().as_text()
  found = re.findall(r"= (\S+) ([a-z-]+?)(?:-start)?\(", text)
  return [(shape, op) for shape, op in found if op in sharding_ops.COLLECTIVES]


def test_tensor_parallel_step_never_moves_whole_vocabulary_logits(llama, data_dir):
  """data=4 × tensor=2 (tensor divides the 2 key/value heads: heads stay whole): logits stay
  vocabulary-parallel through the chunked loss. No collective in the compiled step carries a
  tensor with the whole vocabulary (96) as a dimension, and none reshuffles activations
  (all-to-all, collective-permute). The control, the (untied) lm_head split on its input
  features, does all-reduce whole logits."""
  whole_vocab = lambda moved: [m for m in moved if re.search(r"[\[,]96[\],]", m[0])]
  config = _config(llama, data_dir)
  moved = _collectives(config, "data=4,tensor=2")
  assert moved and not whole_vocab(moved), moved
  assert not [m for m in moved if m[1] in ("all-to-all", "collective-permute")], moved
  config.sharding.rules = ((r"(^|/)lm_head/kernel$", ("tensor", None)), *sharding.DEFAULT_RULES)
  assert whole_vocab(_collectives(config, "data=4,tensor=2"))
