"""Runs the CLIs on bad input, as a new user would, and counts how each case is answered.

  .venv/bin/python scripts/bad_input_matrix.py [--workers 2]

Each case must end before any work with exit code 2 and one line `tool: error: ...` naming what
was wrong, and no traceback. A case is "clear" when it does, "traceback" when a traceback is
printed, "silent" when the tool exits 0 (the input was accepted), "other" otherwise. Needs a
trained smoke run for the eval / export cases: it trains one (seconds) in a temporary folder.
tests/test_config.py holds the same checks in-process, as assertions.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["train.py", "--config=configs/default.py:smoke"]

TRAIN_OVERRIDES = [
  "model.max_rank=4",
  "model.max_rank=0",
  "model.max_rank=64",
  "model.max_rank=-3",
  "model.max_rank=abc",
  "model.max_rnak=4",
  "model.hidden=()",
  "model.hidden=(32,0)",
  "model.name=resnet",
  "model.dtype=float16",
  "model.path=/tmp/x.gguf",
  "model.init_from=runs/x",
  "model.dense=maybe",
  "ranks.fixed=()",
  "ranks.fixed=(8,8)",
  "ranks.fixed=(9,4)",
  "ranks.fixed=(0,4)",
  "ranks.held_out=(3,)",
  "ranks.kind=sampled",
  "ranks.curriculum=cosine",
  "ranks.warmup_fraction=2.0",
  "eval.ranks=(64,16)",
  "eval.ranks=(0,)",
  "eval.batch_size=0",
  "eval.every=0",
  "train.log_every=0",
  "train.checkpoint_every=0",
  "train.max_to_keep=0",
  "train.steps=0",
  "train.steps=-5",
  "train.batch_size=0",
  "train.batch_size=30",
  "train.trainable=()",
  "train.trainable=('(',)",
  "train.multi_rank=fused",
  "optimizer.learning_rate=-0.001",
  "optimizer.learning_rate=0",
  "optimizer.learning_rate=nan",
  "optimizer.learning_rate=inf",
  "optimizer.weight_decay=-0.1",
  "optimizer.warmup_steps=20",
  "optimizer.warmup_steps=-1",
  "objective.name=focal",
  "objective.name=flexrank_distill",
  "objective.logits_weight=-1",
  "flexrank.budgets=(0.5,)",
  "flexrank.budget_unit=bytes",
  "task=segmentation",
  "task=text_classification",
  "task=language_modelling",
  "data.name=",
  "data.image_shape=(28,0,1)",
  "data.num_classes=1",
  "data.seq_len=1",
  "seed=-1",
  "mesh.data=3",
  "mesh.data=0",
  "mesh.fsdp=-1",
  "mesh.tensor=16",
  "sharding.rules=(('(',('fsdp',)),)",
  "surgery.rules=()",
  "surgery.init=qr",
  "surgery.calibration_batches=0",
]

PRETRAINED = ["train.py", "--config=configs/smollm2_genre.py"]
PRETRAINED_OVERRIDES = [
  "model.max_rank=4096",
  "model.max_rank=577",
  "surgery.rules=ffn",
  "surgery.rules=('mlp','x(')",
  "model.path=/nowhere/model.gguf",
  "model.init_from=/nowhere/run",
  "task=image_classification",
  "task=language_modelling",
  "data.seq_len=1",
  "data.text_feature=()",
  "flexrank.budgets=(0.5,1.5)",
  "flexrank.budgets=(0.5,0.5)",
  "flexrank.probabilities=(1.0,)",
  "objective.name=flexrank_distill",
  "model.name=bert_hf",
]


def cases(workdir: str, scratch: str) -> list[list[str]]:
  """Every bad command line, each a list of arguments to python."""
  out = [
    [*SMOKE, f"--workdir={scratch}/t", f"--config.{o}", "--config.train.steps=1"]
    for o in TRAIN_OVERRIDES
  ]
  out += [[*PRETRAINED, f"--workdir={scratch}/p", f"--config.{o}"] for o in PRETRAINED_OVERRIDES]
  out += [
    ["train.py", "--config=configs/nowhere.py", f"--workdir={scratch}/n"],
    ["train.py", "--config=configs/default.py:smok", f"--workdir={scratch}/n"],
    ["train.py", "--config=configs/default.py"],
    ["train.py", "--config=configs/default.py", f"--workdir={scratch}/n", "extra"],
    ["train.py", "--config=configs/default.py", f"--workdir={scratch}/n", "--metrics_dir=gs://b/x"],
  ]
  evals = [
    "--ranks=0,9",
    "--ranks=9",
    "--ranks=two",
    "--ranks=every:0",
    "--ranks=",
    "--budgets=1.5",
    "--budgets=0",
    "--budgets=-0.5",
    "--budgets=abc",
    "--budgets=0.001",
    "--batch_size=0",
    "--step=999",
    "--step=-1",
    "--profiles",
    "--references=/nowhere",
    f"--references={workdir}",
    "--budget_reference=params",
  ]
  out += [["eval.py", f"--workdir={workdir}", flag] for flag in evals]
  out += [["eval.py", f"--workdir={scratch}/none"], ["eval.py", f"--workdir={REPO}/README.md"]]
  export = ["-m", "nsn_jax.export", f"--workdir={workdir}"]
  out += [
    [*export, "--rank=9", f"--out={scratch}/e1"],
    [*export, "--rank=0", f"--out={scratch}/e2"],
    [*export, "--budget=2", f"--out={scratch}/e3"],
    [*export, "--budget=0.001", f"--out={scratch}/e4"],
    [*export, "--rank=4", "--budget=0.5", f"--out={scratch}/e5"],
    [*export, "--rank=4", f"--out={workdir}"],
    [*export, "--profile_budget=0.5", f"--out={scratch}/e6"],
    [*export, "--rank=4", "--form=sparse", f"--out={scratch}/e7"],
    ["-m", "nsn_jax.export", f"--workdir={scratch}/none", "--rank=4", f"--out={scratch}/e8"],
  ]
  out += [
    ["-m", "nsn_jax.llm.generate", "--rank=4"],
    ["-m", "nsn_jax.llm.generate", f"--workdir={workdir}"],
    ["-m", "nsn_jax.llm.generate", "--model=/nowhere.gguf"],
    ["-m", "nsn_jax.llm.generate", f"--model={REPO}/README.md"],
  ]
  return out


def classify(args: list[str]) -> tuple[str, str]:
  try:
    proc = subprocess.run(
      [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=180
    )
  except subprocess.TimeoutExpired:
    return "silent", "(still running after 180 s: the input was accepted)"
  err = proc.stderr.strip().splitlines()
  last = err[-1] if err else ""
  if "Traceback (most recent call last)" in proc.stderr:
    return "traceback", last
  if proc.returncode == 0:
    return "silent", last
  if proc.returncode == 2 and ": error: " in last and len([line for line in err if line]) <= 2:
    return "clear", last
  return "other", f"exit {proc.returncode}: {last}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workers", type=int, default=2)
  options = parser.parse_args()
  with tempfile.TemporaryDirectory() as scratch:
    workdir = os.path.join(scratch, "trained")
    subprocess.run(
      [*[sys.executable], *SMOKE, f"--workdir={workdir}"],
      cwd=REPO,
      check=True,
      capture_output=True,
    )
    todo = cases(workdir, scratch)
    with concurrent.futures.ThreadPoolExecutor(options.workers) as pool:
      results = list(pool.map(classify, todo))
  counts: dict[str, int] = {}
  for args, (kind, line) in zip(todo, results):
    counts[kind] = counts.get(kind, 0) + 1
    shown = " ".join(a.replace(scratch, "TMP") for a in args)
    print(f"{kind:>9}  {shown}\n           {line.replace(scratch, 'TMP')[:160]}")
  print(f"\ntried {len(todo)}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
  main()
