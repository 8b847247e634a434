"""Generation (KV cache) from a pretrained decoder or a fine-tuned nested one, at a chosen rank.

  python -m nsn_jax.llm.generate --prompt="The capital of France is"            # SmolLM2, dense
  python -m nsn_jax.llm.generate --prompt="..." --nsn_max_rank=576 --rank=288   # NSN MLPs at r=288
  python -m nsn_jax.llm.generate --workdir=runs/smollm2_lm --rank=136 --prompt="To be, or"
  python -m nsn_jax.llm.generate --prompt="Once upon" --prompt="The sea" --temperature=0.8 \
      --top_p=0.9 --stop=.                                                      # a sampled batch
  python -m nsn_jax.llm.generate --chat --stream --prompt="Name three rivers."  # chat, streamed
  python -m nsn_jax.llm.generate --model=path/to/hf_dir --prompt="..."           # HF Llama/Qwen2/..

Each `--prompt` is one row of a single batch (`nsn_jax.llm.decode.Decoder`); greedy unless
`--temperature` > 0. Row i samples with seed `--seed` + i. `--model` is a GGUF file or a Hugging
Face decoder directory (default: the offline SmolLM2-135M-Instruct GGUF). `--chat` sends each
prompt as a user message through the model's chat template; `--stream` prints one prompt's
tokens as they are generated.

`--nsn_max_rank` applies `decompose_and_replace` (SVD, MLP projections only) before generating;
`--rank` then picks the budget. Without multi-rank fine-tuning, low ranks degrade quickly: that
shows what plain truncation of the SVD does. `--workdir` loads a decoder fine-tuned by train.py
on language modelling (configs/smollm2_lm.py), whose ranks were trained.
"""

from __future__ import annotations

import sys
import time

from absl import flags

from nsn_jax import cli, flops
from nsn_jax.build import tokenizer as config_tokenizer
from nsn_jax.layers import nsn_layers
from nsn_jax.llm import load_pretrained, pretrained_kind, smollm2_path
from nsn_jax.llm.decode import Decoder, Sampling
from nsn_jax.restore import restore_model
from nsn_jax.surgery import decompose_and_replace, format_report

_MODEL = flags.DEFINE_string(
  "model", None, "GGUF file or Hugging Face decoder directory (default: SmolLM2-135M-Instruct)."
)
_CHAT = flags.DEFINE_bool("chat", False, "Send each prompt as a user message (chat template).")
_STREAM = flags.DEFINE_bool("stream", False, "Print the tokens of one prompt as they come.")
_CACHE = cli.compilation_cache_flag("JAX's persistent compilation cache directory")
_PROMPT = flags.DEFINE_multi_string(
  "prompt", ["The capital of France is"], "Text to continue; repeat for a batch."
)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 20, "Tokens to generate (at most) per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0 = off.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the top tokens of this mass; 1 = off.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed of the first prompt (row i: seed + i).")
_STOP = flags.DEFINE_multi_string("stop", [], "End a row's text before this string (repeatable).")
_NSN_MAX_RANK = flags.DEFINE_integer(
  "nsn_max_rank", None, "Replace the MLP projections by NSN layers of this R."
)
_RANK = flags.DEFINE_integer(
  "rank", None, "Rank to generate at (default R); needs nsn_max_rank or workdir."
)
_WORKDIR = flags.DEFINE_string(
  "workdir",
  None,
  "A train.py workdir of a language-modelling run: generate from its newest checkpoint.",
)


def _load():
  """(model, tokenizer): a train.py workdir's decoder, or a GGUF file (SVD surgery if asked)."""
  if _WORKDIR.value is not None:
    restored = restore_model(_WORKDIR.value)
    config = restored.config
    if config.task != "language_modelling":
      raise ValueError(
        f"--workdir={_WORKDIR.value} was trained for {config.task!r}; generate "
        "needs a language_modelling run."
      )
    return restored.model, config_tokenizer(config)
  path = _MODEL.value or smollm2_path()
  try:
    kind = pretrained_kind(path)
  except (OSError, ValueError) as e:
    raise ValueError(f"--model={path}: {e}") from None
  if kind == "bert":
    raise ValueError(f"--model={path} is a BERT encoder; generation needs a decoder")
  _, model, tokenizer = load_pretrained(path)
  if tokenizer is None:
    raise ValueError(f"--model={path} has no tokenizer.json to encode the prompts with")
  if _NSN_MAX_RANK.value is not None:
    model, report = decompose_and_replace(model, max_rank=_NSN_MAX_RANK.value)
    print(format_report(report), file=sys.stderr)
  return model, tokenizer


def _encode(tokenizer, prompt: str) -> list[int]:
  if _CHAT.value:
    return tokenizer.chat([{"role": "user", "content": prompt}])
  return tokenizer.encode(prompt)


class _Streamer:
  """on_token for Decoder.generate: prints row 0's new text as its tokens arrive, holding back
  what could still become a stop string (and an unfinished multi-byte character); `finish`
  prints the rest of the completion's text."""

  def __init__(self, tokenizer, stops: list[str]):
    self.tokenizer, self.tokens, self.shown = tokenizer, [], 0
    self.hold = max(map(len, stops), default=1) - 1

  def __call__(self, row: int, token: int) -> None:
    self.tokens.append(token)
    text = self.tokenizer.decode(self.tokens).rstrip("\ufffd")
    self._show(text[: len(text) - self.hold])

  def finish(self, text: str) -> None:
    self._show(text)
    print()

  def _show(self, text: str) -> None:
    if len(text) > self.shown:
      sys.stdout.write(text[self.shown :])
      sys.stdout.flush()
      self.shown = len(text)


def main():
  if _RANK.value is not None and _NSN_MAX_RANK.value is None and _WORKDIR.value is None:
    raise ValueError(
      f"--rank={_RANK.value}: needs --nsn_max_rank or --workdir (a dense model has no ranks)"
    )
  if _STREAM.value and len(_PROMPT.value) != 1:
    raise ValueError(f"--stream prints one prompt's tokens; got {len(_PROMPT.value)} prompts")
  cli.use_compilation_cache(_CACHE.value)
  start = time.perf_counter()
  model, tokenizer = _load()
  print(f"loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr)
  rank = None
  if nsn_layers(model):
    rank = _RANK.value or flops.max_rank(model)
    context = max(len(_encode(tokenizer, p)) for p in _PROMPT.value) + _MAX_NEW.value
    # model_flops checks the rank against every NSN layer before anything compiles.
    fraction = flops.model_flops(model, rank, seq_len=context) / flops.dense_model_flops(
      model, seq_len=context
    )
    print(
      f"rank {rank}: {100 * fraction:.1f}% of the dense model's FLOPs per token (whole "
      f"forward pass at a {context}-token context)",
      file=sys.stderr,
    )
  start = time.perf_counter()
  prompts = [_encode(tokenizer, p) for p in _PROMPT.value]
  streamer = _Streamer(tokenizer, _STOP.value) if _STREAM.value else None
  if streamer is not None and not _CHAT.value:
    sys.stdout.write(_PROMPT.value[0])  # as without --stream: the prompt, then its continuation
  sampling = [
    Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value, _SEED.value + i)
    for i in range(len(prompts))
  ]
  decoder = Decoder(model, slots=max(map(len, prompts)) + _MAX_NEW.value)
  completions = decoder.generate(
    prompts,
    _MAX_NEW.value,
    rank,
    sampling=sampling,
    eos_id=tokenizer.eos_ids if hasattr(tokenizer, "eos_ids") else tokenizer.eos_id,
    stop=_STOP.value,
    tokenizer=tokenizer,
    on_token=streamer,
  )
  seconds = time.perf_counter() - start
  count = sum(len(c.tokens) for c in completions)
  print(f"{count} tokens in {seconds:.1f} s (compile included)", file=sys.stderr)
  if streamer is not None:
    streamer.finish(completions[0].text)
    return
  for prompt, completion in zip(_PROMPT.value, completions):
    print(completion.text if _CHAT.value else prompt + completion.text)


if __name__ == "__main__":
  cli.run(main)
