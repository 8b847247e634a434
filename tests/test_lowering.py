"""Every program users run, lowered for TPU and GPU on this CPU with `jax.export`: the sharded
train step of each multi-rank form and of a dense run (an MLP and a decoder language model), the
per-rank evaluation programs, and generation's prefill and decode step. A lowering that fails
only on TPU or GPU (an op without a rule there, a sharding it cannot take) fails here, not on a
rented pod."""

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from configs import smollm2_lm
from nsn_jax import sharding
from nsn_jax.build import build_model, text_encoder
from nsn_jax.data import pipeline
from nsn_jax.evaluate import RankEvaluator
from nsn_jax.llm.decode import Decoder
from nsn_jax.methods import build_method
from nsn_jax.tasks import config_task
from nsn_jax.train_step import abstract_train_state, config_train_step

PLATFORMS = ("tpu", "cuda")
MESH = ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 2})


def _export(fn, *args) -> jax.export.Exported:
  exported = jax.export.export(fn, platforms=PLATFORMS)(*args)
  assert exported.platforms == PLATFORMS
  return exported


def test_the_check_catches_a_program_only_the_cpu_can_lower():
  """The control: `schur` has a CPU lowering only, so exporting it for TPU/GPU fails."""
  schur = jax.jit(lambda x: jax.lax.linalg.schur(x)[0])
  x = jax.ShapeDtypeStruct((4, 4), jnp.float32)
  jax.export.export(schur, platforms=("cpu",))(x)
  with pytest.raises(NotImplementedError, match="'schur' not found for platforms"):
    _export(schur, x)


def _lower_train_and_eval(config, encoder=None) -> None:
  """Exports the config's sharded train step (8 devices) and its evaluation program at two
  ranks (or, dense, as it is)."""
  mesh = sharding.make_mesh(MESH)
  task = config_task(config)
  graphdef, state, state_sharding = abstract_train_state(config, mesh)
  method = build_method(config, task, config.model.max_rank)
  placed = sharding.batch_sharding(mesh)
  real = pipeline.train_batches(config.data, config.train.batch_size, 0, encoder=encoder)[0]
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=placed) for k, v in real.items()}
  step = config_train_step(config, graphdef, method.loss, state_sharding, placed)
  inputs = method.step_inputs(1)
  exported = _export(step, state, batch, jax.ShapeDtypeStruct(inputs.shape, inputs.dtype), None)
  assert exported.nr_devices == 8

  model = nnx.eval_shape(lambda: build_model(config, seed=0, pretrained=False))
  evaluator = RankEvaluator(nnx.graphdef(model), 8, task, mesh)
  example = {
    k: jax.ShapeDtypeStruct((8, *v.shape[1:]), v.dtype, sharding=placed)
    for k, v in batch.items()
    if k in task.keys
  }
  rows = jax.ShapeDtypeStruct((8,), jnp.float32, sharding=placed)
  for rank in (None,) if config.model.dense else (2, config.model.max_rank):
    _export(evaluator._scores, state["model"], example, rows, rank)


@pytest.mark.parametrize("multi_rank", ["vmap_masked", "loop_static", "bucketed", "dense"])
def test_mlp_train_step_and_evaluation_lower_for_tpu_and_gpu(smoke_config, multi_rank):
  if multi_rank == "dense":
    smoke_config.model.dense, smoke_config.eval.ranks = True, ()
  else:
    smoke_config.train.multi_rank = multi_rank
  smoke_config.sharding.min_size = 0  # every parameter sharded over the 2 × 2 × 2 mesh
  _lower_train_and_eval(smoke_config)


def test_language_model_training_evaluation_and_generation_lower_for_tpu_and_gpu(
  tiny_gguf, data_dir
):
  config = smollm2_lm.get_config("smoke")
  config.model.path, config.data.data_dir = tiny_gguf, data_dir
  config.train.multi_rank = "bucketed"
  config.sharding.min_size = 2048  # the test vocabulary (50) cannot split 4 ways: replicated
  _lower_train_and_eval(config, text_encoder(config))
  model = build_model(config, seed=0, pretrained=False)  # the decoder, with NSN MLPs
  for name, (fn, args) in Decoder(model, slots=16).programs(rank=4, batch_size=2).items():
    assert _export(fn, *args).nr_devices == 1, name
