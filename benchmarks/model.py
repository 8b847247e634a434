"""Per-rank inference of whole models against their dense twins, in the same run.

Two models:
  mlp      the MLP of configs/default.py (784 → 256 → 256 → 10, R = 64) against its dense twin
           (`model.dense=True`);
  decoder  a SmolLM2-135M-shaped Llama decoder with random weights whose MLP projections are NSN
           layers (`surgery.decompose_and_replace`, SVD init, R = 576), against the same decoder
           before the surgery; one batch of `seq_len` tokens, logits for every position.
Each rank is measured as `nsn` (static-rank slices of the factors) and as `deployed`
(`nsn_jax.deploy` at that rank, under each form policy: "cheapest" and "matmul").
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import time

from flax import nnx
import jax
import numpy as np

from benchmarks.common import (
  Column,
  SuiteResult,
  eval_program,
  latency_columns,
  latency_fields,
  mlp_config,
  summary_line,
  time_jax,
  xla_flops,
)
from benchmarks.timing import Policy
from nsn_jax import flops
from nsn_jax.build import build_model
from nsn_jax.deploy import POLICIES, deploy
from nsn_jax.models.llama import LlamaConfig, LlamaModel
from nsn_jax.surgery import decompose_and_replace

BATCHES = {"tiny": (1, 8), "full": (1, 128, 1024)}


@dataclasses.dataclass(frozen=True)
class DecoderSetup:
  """The decoder measured: its shape, the NSN max rank of its MLP projections, the static ranks,
  and one input of batch × seq_len tokens."""

  config: LlamaConfig
  max_rank: int
  ranks: tuple[int, ...]
  batch: int
  seq_len: int


DECODERS = {
  "tiny": DecoderSetup(
    LlamaConfig(
      vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64
    ),
    32,
    (4, 8, 16, 32),
    1,
    16,
  ),
  # SmolLM2-135M's shape (docs/environment.md); R = 576 = min(d_in, d_out) of every MLP layer.
  "full": DecoderSetup(
    LlamaConfig(
      vocab_size=49152,
      dim=576,
      n_layers=30,
      n_heads=9,
      n_kv_heads=3,
      ffn_dim=1536,
      rope_theta=1e5,
      max_seq_len=2048,
    ),
    576,
    (72, 144, 288, 576),
    1,
    128,
  ),
}
# One decoder call is ~0.3 s on the 2-core CPU; fewer samples keep its 13 programs to about a
# minute. The median of 5 single calls is still robust to one interrupted call.
DECODER_POLICY = Policy(warmup=1, repeats=5, min_sample_s=0.0)

COLUMNS = (
  Column("model", "model"),
  Column("kind", "kind"),
  Column("batch", "batch"),
  Column("rank", "rank"),
  Column("policy", "policy"),
  Column("forms", "forms"),
  *latency_columns(".2f"),
)


def rank_grid(max_rank: int) -> tuple[int, ...]:
  """Powers of two up to R, and R: 1, 2, 4, ..., 64 for the default MLP."""
  return tuple(
    sorted({2**i for i in range(max_rank.bit_length()) if 2**i <= max_rank} | {max_rank})
  )


def _variants(nsn: nnx.Module, dense: nnx.Module, ranks: Sequence[int], seq_len: int | None):
  """(kind, rank, form policy, deploy report, program, state, FLOPs per row) for the dense
  model, each static rank and each deployed rank × policy."""
  variants = [
    ("dense", None, None, [], *eval_program(dense), flops.dense_model_flops(nsn, seq_len))
  ]
  nsn_program = eval_program(nsn)  # one jitted function; each static rank compiles its program
  variants += [
    ("nsn", r, None, [], *nsn_program, flops.model_flops(nsn, r, seq_len)) for r in ranks
  ]
  for form_policy in POLICIES:
    for r in ranks:
      module, report = deploy(nsn, r, form_policy)
      variants.append(
        (
          "deployed",
          r,
          form_policy,
          report,
          *eval_program(module),
          flops.model_flops(module, None, seq_len),
        )
      )
  return variants


def _measure(model_name: str, variants, x, rows_per_input: int, policy: Policy) -> list[dict]:
  """One row per variant on input x; rows_per_input is its number of rows (examples or
  tokens), the factor from FLOPs per row to FLOPs per call."""
  rows = []
  for kind, rank, form_policy, report, fn, state, flops_per_row in variants:
    arg_rank = rank if kind == "nsn" else None
    start = time.perf_counter()
    counted = xla_flops(fn, state, x, arg_rank)  # compiles the program the timed calls reuse
    compile_s = time.perf_counter() - start
    timing = time_jax(fn, state, x, arg_rank, policy=policy)
    analytic = rows_per_input * flops_per_row
    rows.append(
      {
        "model": model_name,
        "kind": kind,
        "batch": x.shape[0],
        "rank": rank,
        "policy": form_policy,
        "forms": sorted({entry.form for entry in report}) or None,
        # (d_in, d_out, rank, form) per deployed layer: what the FLOP check of the tests needs
        "layers": [[e.in_features, e.out_features, e.rank, e.form] for e in report],
        **latency_fields(timing, analytic, counted),
        "lower_and_compile_s": compile_s,
      }
    )
  for row in rows:
    row["vs_dense"] = row["latency_s"] / rows[0]["latency_s"]
  return rows


def _mlp_rows(size: str, policy: Policy) -> list[dict]:
  config = mlp_config(size)
  nsn = build_model(config, seed=0)
  dense_config = config.copy_and_resolve_references()
  dense_config.model.dense = True  # the same MLP with plain dense hidden layers
  dense = build_model(dense_config, seed=0)
  variants = _variants(nsn, dense, rank_grid(flops.max_rank(nsn)), None)
  rng = np.random.default_rng(1)  # host-side inputs: no random-number programs to compile
  rows = []
  for batch in BATCHES[size]:
    x = jax.device_put(rng.random((batch, *config.data.image_shape), np.float32))
    rows += _measure("mlp", variants, x, batch, policy)
  return rows


def _decoder_rows(size: str, policy: Policy) -> list[dict]:
  setup = DECODERS[size]
  dense = LlamaModel(setup.config, rngs=nnx.Rngs(0))
  nsn, _ = decompose_and_replace(dense, max_rank=setup.max_rank)
  variants = _variants(nsn, dense, setup.ranks, setup.seq_len)
  tokens = np.random.default_rng(1).integers(
    0, setup.config.vocab_size, (setup.batch, setup.seq_len), dtype=np.int32
  )
  rows = _measure(
    "decoder",
    variants,
    jax.device_put(tokens),
    setup.batch * setup.seq_len,
    policy if size == "tiny" else DECODER_POLICY,
  )
  for row in rows:
    row["seq_len"] = setup.seq_len
  return rows


def run(size: str, policy: Policy) -> SuiteResult:
  rows = _mlp_rows(size, policy) + _decoder_rows(size, policy)
  summary = []
  for model_name, batch in sorted({(row["model"], row["batch"]) for row in rows}):
    group = [row for row in rows if (row["model"], row["batch"]) == (model_name, batch)]
    nsn = {row["rank"]: row["latency_s"] for row in group if row["kind"] == "nsn"}
    r = max(nsn)
    summary += [
      summary_line(f"{model_name} batch {batch}: latency(R/4) / latency(R)", nsn[r // 4] / nsn[r]),
      summary_line(
        f"{model_name} batch {batch}: latency(R) / dense latency", nsn[r] / group[0]["latency_s"]
      ),
      *[
        summary_line(
          f"{model_name} batch {batch}: slowest deployed rank / dense latency "
          f"(form policy {form_policy!r})",
          max(
            row["vs_dense"]
            for row in group
            if row["kind"] == "deployed" and row["policy"] == form_policy
          ),
        )
        for form_policy in POLICIES
      ],
    ]
  notes = [
    "decoder: random weights, MLP projections as NSN layers (SVD init), attention dense; "
    "batch = sequences, every token's logits computed; FLOPs = whole forward pass "
    "(nsn_jax.flops with seq_len: attention and the tied head included) × tokens"
  ]
  return SuiteResult(rows, summary, notes, COLUMNS)
