"""decompose_and_replace: exact selection by path rules, full-rank equivalence, the report."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsn_jax.layers import at_rank, nsn_layers
from nsn_jax.surgery import ATTENTION_RULES, MLP_RULES, decompose_and_replace, format_report


class Attn(nnx.Module):
  def __init__(self, d, rngs):
    self.q, self.k, self.v, self.o = (nnx.Linear(d, d, rngs=rngs) for _ in range(4))

  def __call__(self, x):
    q, k, v = (p(x) for p in (self.q, self.k, self.v))
    weights = jax.nn.softmax(q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1]))
    return self.o(weights @ v)


class MLP(nnx.Module):
  def __init__(self, d, hidden, rngs):
    self.gate = nnx.Linear(d, hidden, use_bias=False, rngs=rngs)
    self.up = nnx.Linear(d, hidden, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(hidden, d, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
  def __init__(self, d, hidden, rngs):
    self.attn, self.mlp = Attn(d, rngs), MLP(d, hidden, rngs)

  def __call__(self, x):
    x = x + self.attn(x)
    return x + self.mlp(x)


class Toy(nnx.Module):
  """Llama-style module paths: layers/N/attn/{q,k,v,o}, layers/N/mlp/{gate,up,down}; no code
  of its own for ranks (a `rank` argument opens a scope, as the project's models do)."""

  def __init__(self, d=16, hidden=24, n=2, seed=0):
    rngs = nnx.Rngs(seed)
    self.layers = nnx.List([Block(d, hidden, rngs) for _ in range(n)])
    self.head = nnx.Linear(d, 5, rngs=rngs)

  def __call__(self, x, rank=None):
    with at_rank(rank):
      for block in self.layers:
        x = block(x)
      return self.head(x)


def test_default_rules_replace_exactly_the_mlp_projections():
  model = Toy()
  nsn, report = decompose_and_replace(model, max_rank=64)
  expected = sorted(f"layers/{i}/mlp/{p}" for i in range(2) for p in ("gate", "up", "down"))
  assert sorted(r.path for r in report) == expected
  assert sorted(nsn_layers(nsn)) == expected
  assert isinstance(nsn.layers[0].attn.q, nnx.Linear) and isinstance(nsn.head, nnx.Linear)
  assert not nsn_layers(model)  # the original is untouched


def test_attention_rules_select_attention_only():
  _, report = decompose_and_replace(Toy(), ATTENTION_RULES, max_rank=8)
  assert {r.path.split("/")[-1] for r in report} == {"q", "k", "v", "o"} and len(report) == 8


def test_a_rule_given_as_a_string_is_one_rule():
  """Not a sequence of one-character regexes (which would match every layer)."""
  _, report = decompose_and_replace(Toy(), MLP_RULES[0], max_rank=8)
  assert sorted(r.path for r in report) == sorted(
    f"layers/{i}/mlp/{p}" for i in range(2) for p in ("gate", "up", "down")
  )


def test_full_rank_reproduces_the_dense_model():
  model = Toy()
  x = jax.random.normal(jax.random.key(1), (3, 7, 16))
  nsn, report = decompose_and_replace(model, (*MLP_RULES, *ATTENTION_RULES), max_rank=1000)
  assert all(r.max_rank == min(r.in_features, r.out_features) for r in report)
  dense_out, nsn_out = model(x), nsn(x)
  assert float(jnp.linalg.norm(nsn_out - dense_out) / jnp.linalg.norm(dense_out)) <= 1e-4
  assert all(r.error_at_max_rank <= 1e-5 and r.error_at_half_rank > 0.1 for r in report)
  assert not np.allclose(nsn(x, rank=4), dense_out, atol=1e-3)  # lower ranks really change it


def test_report_flags_ranks_above_break_even_and_bad_rules_fail():
  _, report = decompose_and_replace(Toy(), max_rank=16)
  table = format_report(report)
  assert "layers/0/mlp/gate" in table and "cost more than dense" in table  # r* = 9.6 < 16
  with pytest.raises(ValueError, match="match none"):
    decompose_and_replace(Toy(), (r"(^|/)ffn/",))
