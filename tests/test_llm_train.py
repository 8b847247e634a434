"""Multi-rank fine-tuning of pretrained text models through train.py's library and eval.py's sweep.

Tiny random-weight checkpoints written here (a GGUF Llama, a Hugging Face BERT directory) stand
in for SmolLM2 and MiniLM, on the real offline Shakespeare data; the configs are the shipped
ones at their `:smoke` size.
"""

import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_bert import TINY as BERT_TINY
from test_bert import hf_config, hf_weights, write_hf
from test_bert import tiny_model as tiny_bert

from configs import minilm_genre, smollm2_genre
from nsn_jax import flops
from nsn_jax.build import build_model, text_encoder
from nsn_jax.config import ConfigError, validate
from nsn_jax.data import pipeline
from nsn_jax.layers import nsn_layers
from nsn_jax.restore import restore_model
from nsn_jax.sweep import run_sweep
from nsn_jax.train_lib import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(module, variant, path, data_dir, **overrides):
  config = module.get_config(variant)
  config.model.path, config.data.data_dir = path, data_dir
  for key, value in overrides.items():
    section, field = key.split("__")
    config[section][field] = value
  return config


def _svd_smoke(path, data_dir, **overrides):
  """The genre smoke config on the GGUF at `path`, with plain SVD surgery."""
  return _config(smollm2_genre, "smoke", path, data_dir, surgery__init="svd", **overrides)


@pytest.fixture(scope="module")
def genre_runs(tiny_gguf, data_dir, tmp_path_factory):
  """(nsn workdir, dense workdir, final metrics) of the genre smoke config on the tiny GGUF."""
  root = tmp_path_factory.mktemp("genre")
  nsn = train_and_evaluate(_config(smollm2_genre, "smoke", tiny_gguf, data_dir), str(root / "nsn"))
  dense = train_and_evaluate(
    _config(smollm2_genre, "dense,smoke", tiny_gguf, data_dir), str(root / "dense")
  )
  return str(root / "nsn"), str(root / "dense"), nsn, dense


def test_genre_fine_tuning_trains_only_the_chosen_parameters(genre_runs, tiny_gguf):
  nsn_dir, dense_dir, nsn_metrics, dense_metrics = genre_runs
  assert set(nsn_metrics) >= {"eval/rank_8/accuracy", "eval/rank_2/accuracy"}
  assert "eval/dense/accuracy" in dense_metrics
  from nsn_jax.llm import load_gguf

  pretrained = load_gguf(tiny_gguf)[1]
  for workdir in (nsn_dir, dense_dir):
    model = restore_model(workdir)[0]
    backbone = model.backbone
    # Frozen: attention and embeddings are exactly the pretrained weights.
    np.testing.assert_array_equal(
      backbone.layers[0].attn.q.kernel[...], pretrained.layers[0].attn.q.kernel[...]
    )
    np.testing.assert_array_equal(backbone.embed.embedding[...], pretrained.embed.embedding[...])
  nsn_model, dense_model = restore_model(nsn_dir)[0], restore_model(dense_dir)[0]
  assert sorted(nsn_layers(nsn_model)) == [
    f"backbone/layers/{i}/mlp/{p}" for i in range(2) for p in ("down", "gate", "up")
  ]
  assert not nsn_layers(dense_model)
  # Trained: the dense twin's MLP moved away from the pretrained kernel.
  assert not np.allclose(
    dense_model.backbone.layers[0].mlp.up.kernel[...], pretrained.layers[0].mlp.up.kernel[...]
  )


def test_sweep_with_a_dense_reference_row(genre_runs):
  nsn_dir, dense_dir, nsn_metrics, _ = genre_runs
  rows = run_sweep(
    nsn_dir, "2,8", budgets=[0.9], budget_reference="dense", references=[dense_dir], verbose=False
  )
  by_rank = {r.rank: r for r in rows if not r.model.startswith("dense+svd")}
  assert {r.rank for r in rows if r.model.startswith("dense+svd")} == {2, 8}  # the baseline
  assert by_rank[8].accuracy == pytest.approx(nsn_metrics["eval/rank_8/accuracy"])
  assert by_rank[8].loss == pytest.approx(nsn_metrics["eval/rank_8/loss"], rel=1e-5)
  reference = by_rank[None]
  assert reference.model == f"dense: {dense_dir}" and reference.flops_frac_dense == 1.0
  # Whole forward (attention, projections, head) per 16-token example, checked against XLA,
  # which also counts norms, RoPE and softmax: 12% at this 32-wide size (tests/test_heads.py
  # holds a 128-wide model to 5%).
  for row in rows:
    assert row.flops <= row.xla_flops <= 1.2 * row.flops, row
  assert by_rank[2].flops < by_rank[8].flops
  with pytest.raises(ValueError, match="must be dense"):
    run_sweep(nsn_dir, "2", references=[nsn_dir], verbose=False)


def test_language_modelling_reports_perplexity_and_generates(lm_run, genre_runs, tmp_path):
  workdir, final = lm_run
  rows = run_sweep(workdir, "8", out=str(tmp_path), verbose=False)
  assert rows[0].perplexity == pytest.approx(np.exp(final["eval/rank_8/loss"]), rel=1e-5)
  assert 0 <= rows[0].accuracy <= 1
  with pytest.raises(ValueError, match="another task, data.name, data.num_classes"):
    run_sweep(workdir, "8", references=[genre_runs[1]], out=str(tmp_path), verbose=False)
  cli = lambda *flags: subprocess.run(
    [
      sys.executable,
      "-m",
      "nsn_jax.llm.generate",
      f"--workdir={workdir}",
      "--prompt=ab",
      "--max_new_tokens=3",
      *flags,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  done = cli("--rank=2")
  assert done.returncode == 0 and done.stdout.startswith("ab"), done.stderr[-2000:]
  assert "rank 2:" in done.stderr
  bad = cli("--rank=9")
  assert bad.returncode == 2 and "valid ranks are 1..8" in bad.stderr


def test_activation_aware_surgery_from_training_batches(tiny_gguf, data_dir, tmp_path):
  config = _config(
    smollm2_genre,
    "smoke",
    tiny_gguf,
    data_dir,
    surgery__init="activation_aware",
    surgery__calibration_batches=2,
    train__steps=2,
  )
  final = train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(final["eval/rank_2/loss"])


def test_bert_encoder_fine_tuning(data_dir, tmp_path):
  directory = write_hf(tmp_path / "bert", hf_config(BERT_TINY), hf_weights(tiny_bert()))
  final = train_and_evaluate(
    _config(minilm_genre, "smoke", str(directory), data_dir), str(tmp_path / "run")
  )
  assert np.isfinite(final["eval/rank_8/loss"])


def test_minilm_comparison_ranks_cost_the_comparison_budgets():
  """configs/minilm_genre.py:compare trains the uniform ranks at FlexRank's budgets (real
  MiniLM shapes from its config.json; no weights needed)."""
  config = minilm_genre.get_config("compare")
  model = nnx.eval_shape(lambda: build_model(config, seed=0, pretrained=False))
  at_budgets = [
    flops.rank_for_budget(model, budget, "dense", config.data.seq_len)
    for budget in sorted(minilm_genre.COMPARE_BUDGETS, reverse=True)
  ]
  assert (config.model.max_rank, *at_budgets) == minilm_genre.COMPARE_RANKS
  assert config.flexrank.budgets == minilm_genre.COMPARE_BUDGETS
  with pytest.raises(ValueError, match="compare goes alone"):
    minilm_genre.get_config("compare,flexrank")


def test_model_dtype_is_the_pretrained_models_computation_dtype(tiny_gguf, data_dir, tmp_path):
  config = _svd_smoke(
    tiny_gguf,
    data_dir,
    train__steps=2,
    model__dtype="bfloat16",
  )
  batch = pipeline.train_batches(config.data, 8, 0, encoder=text_encoder(config))[0]
  model = build_model(config, seed=0)
  tokens, mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"])
  encode = nnx.jit(lambda m: m.backbone.encode(tokens, mask, rank=8))  # eager ops are slow
  hidden = encode(model)
  assert hidden.dtype == jnp.bfloat16
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
  config.model.dtype = "float32"
  reference = encode(build_model(config, seed=0))
  assert reference.dtype == jnp.float32
  error = jnp.linalg.norm(hidden.astype(jnp.float32) - reference) / jnp.linalg.norm(reference)
  assert 1e-5 < float(error) < 3e-2  # bf16 rounding: different, but the same function
  config.model.dtype = "bfloat16"
  assert np.isfinite(train_and_evaluate(config, str(tmp_path / "bf16"))["eval/rank_8/loss"])
  config.model.dtype = "float16"
  with pytest.raises(ConfigError, match="model.dtype='float16'"):
    validate(config)


def test_bad_llm_configs_are_refused(tiny_gguf, data_dir, tmp_path):
  with pytest.raises(ValueError, match="loop_static.*anchor_variants"):
    train_and_evaluate(
      _config(smollm2_genre, "smoke", tiny_gguf, data_dir, ranks__kind="anchor_variants"),
      str(tmp_path / "a"),
    )
  with pytest.raises(ValueError, match=r"surgery.rules=\('ffn',\): 'ffn' matches no dense layer"):
    train_and_evaluate(
      _config(smollm2_genre, "smoke", tiny_gguf, data_dir, surgery__rules=("ffn",)),
      str(tmp_path / "b"),
    )


def test_a_prepared_tfds_text_pair_dataset_runs_by_config(tiny_gguf, tmp_path):
  """glue/mnli as a user would have it prepared (built locally here): two text features."""
  from fakes import FakeMnli

  FakeMnli(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
  config = _config(
    smollm2_genre,
    "smoke",
    tiny_gguf,
    str(tmp_path / "tfds"),
    train__steps=2,
    data__eval_split="validation_matched",
  )
  config.data.name, config.data.text_feature = "glue/mnli", ("premise", "hypothesis")
  final = train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(final["eval/rank_8/loss"])
  config.data.text_feature = ("premise", "sentence")
  with pytest.raises(ValueError, match="sentence"):
    train_and_evaluate(config, str(tmp_path / "bad"))


def test_a_text_classifier_is_served_as_eval_reads_it(genre_runs):
  """The server's text path tokenises as the eval pipeline does and runs the same model."""
  from nsn_jax.data.text import encode_texts
  from nsn_jax.serve.classify import Classifier
  from nsn_jax.serve.engine import RequestError

  restored = restore_model(genre_runs[0])
  engine = Classifier(restored, (2, 8), (4,))
  texts = ["To be, or not to be", "hello the abc " * 20]  # the second is cut at data.seq_len
  parsed = engine.parse({"texts": texts, "rank": 2}, 4)
  (result,), _ = engine.run(parsed.rank, 4, [parsed])
  config = restored.config
  encoder = text_encoder(config)
  batch = encode_texts(texts, encoder.encode, config.data.seq_len, encoder.pad_id)
  expected = jax.nn.softmax(restored.model(batch["tokens"], batch["mask"], rank=2))
  np.testing.assert_allclose(result["probabilities"], expected, rtol=1e-5, atol=1e-7)
  assert engine.flops(2) == config.data.seq_len * flops.model_flops(restored.model, 2, 16)
  for bad in ({"texts": "one string"}, {"texts": []}, {"texts": ["ok", 3]}, {"inputs": [[0]]}):
    with pytest.raises(RequestError):
      engine.parse(bad, 4)
