"""The transformers side of benchmarks.generation: greedy tokens/s of `model.generate` on a
Hugging Face directory, batch 1, after a warm-up. Runs in the torch venv (never imports jax):

  .venv-torch/bin/python benchmarks/generation_torch.py MODEL_DIR PROMPT_TOKENS NEW_TOKENS

Prints one JSON line: {"tokens_per_s": median of 3 timed generations}.
"""

import json
import statistics
import sys
import time

import torch
import transformers


def main(model_dir: str, prompt_tokens: int, new_tokens: int) -> None:
  torch.set_num_threads(1)
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
  vocab = model.config.vocab_size
  prompt = torch.tensor([[(7 * i + 3) % (vocab - 1) + 1 for i in range(prompt_tokens)]])
  settings = dict(
    max_new_tokens=new_tokens,
    min_new_tokens=new_tokens,  # EOS ignored, as on the JAX side
    do_sample=False,
    attention_mask=torch.ones_like(prompt),
    pad_token_id=0,
  )
  with torch.inference_mode():
    model.generate(prompt, **settings)  # warm-up
    rates = []
    for _ in range(3):
      start = time.perf_counter()
      out = model.generate(prompt, **settings)
      rates.append((out.shape[1] - prompt_tokens) / (time.perf_counter() - start))
  print(json.dumps({"tokens_per_s": statistics.median(rates)}))


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
