"""Calibration capture and activation-aware decompose_and_replace on a tiny Llama model.

`-m slow` measures the same on SmolLM2-135M: calibrated on stdlib docstrings, scored on others.
"""

import ast
import sysconfig
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_llama import TINY, forward, tiny_model, tiny_tokens

from nsn_jax.flexrank import output_error
from nsn_jax.llm import load_gguf, smollm2_path
from nsn_jax.surgery import capture_inputs, decompose_and_replace, format_report

MLP_PATHS = [f"layers/{i}/mlp/{p}" for i in range(TINY.n_layers) for p in ("down", "gate", "up")]


def correlated_model():
  """TINY whose embeddings have 4 dominant directions, so every layer sees correlated inputs."""
  model = tiny_model()
  rng = np.random.default_rng(0)
  table = rng.normal(size=(TINY.vocab_size, 4)) @ rng.normal(size=(4, TINY.dim)) + 0.1 * rng.normal(
    size=(TINY.vocab_size, TINY.dim)
  )
  model.embed.embedding[...] = jnp.asarray(table, jnp.float32)
  return model


def calibrate(model, tokens, **kwargs):
  return capture_inputs(model, lambda m: m(tokens), **kwargs)


def test_capture_records_the_inputs_and_leaves_the_model_as_it_was():
  model, tokens = correlated_model(), tiny_tokens(batch=8, length=16, seed=1)
  linears = [(block.mlp.gate, block.mlp.up, block.mlp.down) for block in model.layers]
  before = forward(model, tokens)[0]
  rows = calibrate(model, tokens)
  assert sorted(rows) == MLP_PATHS
  for i, block in enumerate(model.layers):
    gate_in, down_in = rows[f"layers/{i}/mlp/gate"], rows[f"layers/{i}/mlp/down"]
    assert gate_in.shape == (128, TINY.dim) and down_in.shape == (128, TINY.ffn_dim)
    assert gate_in.dtype == np.float32
    np.testing.assert_array_equal(rows[f"layers/{i}/mlp/up"], gate_in)
    # The down projection's rows are what the block's SwiGLU makes of the gate's rows.
    swiglu = jax.nn.silu(block.mlp.gate(gate_in)) * block.mlp.up(gate_in)
    np.testing.assert_allclose(down_in, swiglu, atol=1e-5)
  assert [(b.mlp.gate, b.mlp.up, b.mlp.down) for b in model.layers] == linears  # same objects
  np.testing.assert_array_equal(forward(model, tokens)[0], before)

  capped = capture_inputs(model, lambda m: [m(tokens[:2]), m(tokens[2:])], max_rows=40)
  assert all(capped[path].shape[0] == 40 for path in MLP_PATHS)
  # The first 40 rows in call order; a batch of 2 rounds a little differently from one of 8.
  np.testing.assert_allclose(capped["layers/1/mlp/down"], rows["layers/1/mlp/down"][:40], atol=1e-5)


def test_capture_restores_the_model_when_forward_fails():
  model, tokens = correlated_model(), tiny_tokens()
  gate = model.layers[0].mlp.gate
  with pytest.raises(ValueError, match="eagerly"):
    capture_inputs(model, lambda m: forward(m, tokens), rules=(r"layers/0/mlp/gate$",))
  assert model.layers[0].mlp.gate is gate
  with pytest.raises(ValueError, match=r"never called .*layers/1/mlp/up"):
    capture_inputs(
      model, lambda m: m.layers[0].mlp.gate(jnp.ones((1, TINY.dim))), rules=(r"mlp/(gate|up)$",)
    )
  assert isinstance(model.layers[1].mlp.up, nnx.Linear)


def test_activation_aware_init_beats_svd_on_the_calibration_rows():
  model = correlated_model()
  rows = calibrate(model, tiny_tokens(batch=8, length=16, seed=1))
  aware, aware_report = decompose_and_replace(model, max_rank=64, calibration=rows)
  plain, plain_report = decompose_and_replace(model, max_rank=64)
  assert {r.init for r in aware_report} == {"activation_aware"}
  assert {r.init for r in plain_report} == {"svd"}
  assert all(r.output_error_at_half_rank is None for r in plain_report)
  gains = []
  for report in aware_report:
    kernel, path = _module(model, report.path).kernel[...], report.path
    errors = [
      [
        output_error(kernel, layer.a[...], layer.b[...], rows[path], r)
        for layer in (_module(aware, path), _module(plain, path))
      ]
      for r in range(1, report.max_rank + 1)
    ]
    assert all(aware_err <= plain_err + 1e-6 for aware_err, plain_err in errors), (path, errors)
    gains += [aware_err / plain_err for aware_err, plain_err in errors[:-1]]
    assert report.output_error_at_half_rank == pytest.approx(errors[report.max_rank // 2 - 1][0])
  assert min(gains) < 0.8, gains  # the correlation is strong enough to matter somewhere
  aware_row = format_report(aware_report).split("\n")[1].split()
  plain_row = format_report(plain_report).split("\n")[1].split()
  assert aware_row[5] == "activation_aware" and plain_row[5] == "svd"
  assert aware_row[8] == f"{aware_report[0].output_error_at_half_rank:.3f}" and plain_row[8] == "-"


def test_activation_aware_full_rank_reproduces_the_dense_logits():
  model = correlated_model()
  rows = calibrate(model, tiny_tokens(batch=8, length=16, seed=1))
  aware, report = decompose_and_replace(model, max_rank=1000, calibration=rows)
  assert all(r.max_rank == min(r.in_features, r.out_features) for r in report)
  held_out = tiny_tokens(batch=4, length=16, seed=2)
  dense, nsn = forward(model, held_out)[0], forward(aware, held_out)[0]
  assert float(jnp.linalg.norm(nsn - dense) / jnp.linalg.norm(dense)) <= 1e-4


def test_calibration_missing_a_chosen_layer_raises():
  model = correlated_model()
  rows = calibrate(model, tiny_tokens())
  del rows["layers/1/mlp/down"]
  with pytest.raises(ValueError, match=r"no activations .*'layers/1/mlp/down'"):
    decompose_and_replace(model, max_rank=8, calibration=rows)


def _module(model, path):
  """The module at `path` ("layers/0/mlp/up") of a LlamaModel."""
  _, i, _, name = path.split("/")
  return getattr(model.layers[int(i)].mlp, name)


# ---- real activations: SmolLM2-135M-Instruct on English text from the standard library ----

BLOCKS, RANKS, SEQ_LEN = (1, 8, 15, 22, 29), (64, 128, 288), 64
# Disjoint sources: calibration and held-out text never share a docstring.
CALIBRATION_MODULES = ("argparse", "inspect", "typing", "functools")
HELD_OUT_MODULES = ("subprocess", "tarfile", "shutil", "threading")


def stdlib_docstrings(modules) -> str:
  """Every docstring in these standard-library modules' sources, in `ast.walk` order.

  Real English prose that every machine has offline; fixed for a given Python version.
  """
  root, docs = sysconfig.get_paths()["stdlib"], []
  for module in modules:
    with open(f"{root}/{module}.py", encoding="utf-8") as source:
      tree = ast.parse(source.read())
    docs += [
      doc
      for node in ast.walk(tree)
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
      and (doc := ast.get_docstring(node))
    ]
  return "\n\n".join(docs)


def token_batches(tokenizer, modules, n_sequences, batch=16):
  """The text's first n_sequences · SEQ_LEN tokens as int32 batches (batch, SEQ_LEN)."""
  ids = tokenizer.encode(stdlib_docstrings(modules))
  assert len(ids) >= n_sequences * SEQ_LEN, (modules, len(ids))
  sequences = np.asarray(ids[: n_sequences * SEQ_LEN], np.int32).reshape(n_sequences, SEQ_LEN)
  return [jnp.asarray(sequences[i : i + batch]) for i in range(0, n_sequences, batch)]


@pytest.mark.slow
def test_smollm2_activation_aware_beats_svd_on_held_out_text():
  start = time.perf_counter()
  _, model, tokenizer = load_gguf(smollm2_path())
  rules = (rf"^layers/({'|'.join(map(str, BLOCKS))})/mlp/(gate|up|down)$",)

  def run(batches):
    def forward(model):
      for tokens in batches:
        model(tokens)  # the logits are dropped: only the captured inputs are kept

    return forward

  calibration = capture_inputs(
    model, run(token_batches(tokenizer, CALIBRATION_MODULES, 128)), rules
  )
  held_out = capture_inputs(model, run(token_batches(tokenizer, HELD_OUT_MODULES, 64)), rules)
  aware, report = decompose_and_replace(model, rules, max_rank=576, calibration=calibration)
  plain, _ = decompose_and_replace(model, rules, max_rank=576)
  print(f"\n{format_report(report)}")
  print(
    f"held-out relative output error ‖X(W − W_r)‖/‖XW‖, svd → activation-aware "
    f"({len(calibration[report[0].path])} calibration rows, "
    f"{len(held_out[report[0].path])} held-out rows)"
  )
  print(f"{'layer':<20}" + "".join(f"{f'r={r}':>18}" for r in RANKS))
  pairs = []
  for entry in report:
    kernel = _module(model, entry.path).kernel[...]
    row = [
      [
        output_error(kernel, layer.a[...], layer.b[...], held_out[entry.path], r)
        for layer in (_module(plain, entry.path), _module(aware, entry.path))
      ]
      for r in RANKS
    ]
    pairs += row
    print(f"{entry.path:<20}" + "".join(f"{p:>9.3f} → {a:.3f}" for p, a in row))
  plain_err, aware_err = np.asarray(pairs).T
  print(
    f"{'mean':<20}"
    + "".join(
      f"{p:>9.3f} → {a:.3f}"
      for p, a in zip(
        plain_err.reshape(-1, len(RANKS)).mean(0), aware_err.reshape(-1, len(RANKS)).mean(0)
      )
    )
  )
  wins = float(np.mean(aware_err < plain_err))
  print(
    f"activation-aware lower on {wins:.0%} of {len(pairs)} (layer, rank) pairs; "
    f"{time.perf_counter() - start:.0f} s"
  )
  assert wins >= 0.8 and aware_err.mean() < plain_err.mean()
