"""Loads a directory written by `python -m nsn_jax.export --format=hf` in transformers and compares
its logits with the ones nsn_jax saved beside it (hf_check.npz: tokens and logits).

Runs in its own venv with torch and transformers, never the project's:

  python3 -m venv /tmp/hfvenv
  /tmp/hfvenv/bin/pip install torch==2.13.0 transformers==4.57.6 safetensors numpy
  /tmp/hfvenv/bin/python scripts/check_hf_export.py OUT [OUT ...]

Prints one line per directory: the relative logit error and whether transformers' tokenizer
(when the export has one) encodes the check text as nsn_jax did. Exits 1 if any error > 1e-4.
"""

import pathlib
import sys

import numpy as np
import torch
import transformers


def check(directory: pathlib.Path) -> float:
  saved = np.load(directory / "hf_check.npz")
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32)
  with torch.no_grad():
    logits = model(torch.tensor(saved["tokens"], dtype=torch.long)).logits.float().numpy()
  error = float(np.linalg.norm(logits - saved["logits"]) / np.linalg.norm(saved["logits"]))
  line = f"{directory}: {model.config.model_type}, logits relative error {error:.2e}"
  if (directory / "tokenizer.json").exists() and "text" in saved:
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    same = tokenizer(str(saved["text"]))["input_ids"] == saved["text_ids"].tolist()
    line += f", tokenizer {'agrees' if same else 'DIFFERS'}"
  print(line)
  return error


if __name__ == "__main__":
  errors = [check(pathlib.Path(d)) for d in sys.argv[1:]]
  sys.exit(0 if errors and max(errors) <= 1e-4 else 1)
