"""Greedy generation from a GGUF model, dense or with its MLPs turned into NSN layers.

  python -m nsn_jax.llm.generate --prompt="The capital of France is"            # SmolLM2, dense
  python -m nsn_jax.llm.generate --prompt="..." --nsn_max_rank=576 --rank=288   # NSN MLPs at r=288

`--nsn_max_rank` applies `decompose_and_replace` (SVD, MLP projections only) before generating;
`--rank` then picks the budget. Without multi-rank fine-tuning, low ranks degrade quickly: this
shows what plain truncation of the SVD does, not what a trained NSN model does.
"""
from __future__ import annotations

import sys
import time

from absl import app, flags, logging

from nsn_jax import flops
from nsn_jax.llm.gguf import load_gguf, smollm2_path
from nsn_jax.models.llama import generate
from nsn_jax.surgery import decompose_and_replace, format_report

_GGUF = flags.DEFINE_string("gguf", None, "GGUF file (default: SmolLM2-135M-Instruct, offline).")
_PROMPT = flags.DEFINE_string("prompt", "The capital of France is", "Text to continue.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 20, "Tokens to generate.")
_NSN_MAX_RANK = flags.DEFINE_integer("nsn_max_rank", None,
                                     "Replace the MLP projections by NSN layers of this R.")
_RANK = flags.DEFINE_integer("rank", None, "Rank to generate at (default R); needs nsn_max_rank.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  if _RANK.value is not None and _NSN_MAX_RANK.value is None:
    sys.exit("generate: --rank needs --nsn_max_rank (a dense model has no ranks).")
  start = time.perf_counter()
  _, model, tokenizer = load_gguf(_GGUF.value or smollm2_path())
  print(f"loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr)
  rank = None
  if _NSN_MAX_RANK.value is not None:
    model, report = decompose_and_replace(model, max_rank=_NSN_MAX_RANK.value)
    print(format_report(report), file=sys.stderr)
    rank = _RANK.value or flops.max_rank(model)
    context = len(tokenizer.encode(_PROMPT.value)) + _MAX_NEW.value
    try:  # checks the rank against every NSN layer before anything compiles
      fraction = (flops.model_flops(model, rank, seq_len=context) /
                  flops.dense_model_flops(model, seq_len=context))
    except ValueError as e:
      sys.exit(f"generate: {e}")
    print(f"rank {rank}: {100 * fraction:.1f}% of the dense model's FLOPs per token (whole "
          f"forward pass at a {context}-token context)", file=sys.stderr)
  start = time.perf_counter()
  tokens = generate(model, tokenizer.encode(_PROMPT.value), _MAX_NEW.value, rank,
                    eos_id=tokenizer.eos_id)
  seconds = time.perf_counter() - start
  print(f"{len(tokens)} tokens in {seconds:.1f} s (compile included)", file=sys.stderr)
  print(_PROMPT.value + tokenizer.decode(tokens))


if __name__ == "__main__":
  app.run(main)
