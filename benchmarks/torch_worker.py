"""The PyTorch reference: the NSN layer and MLP, and the MLP's multi-rank train step.

Runs in its own venv, never the project's (benchmarks.torch_ref starts it), two ways:
  .venv-torch/bin/python -m benchmarks.torch_worker < spec.json > rows.json   # inference grid
  .venv-torch/bin/python -m benchmarks.torch_worker --serve    # train steps, on request
It imports only torch, numpy, the standard library and benchmarks.timing / line_worker (the same
timing helper as the JAX suites). The model mirrors nsn_jax: factors a (d_in, R) and b (R, d_out),
rank r uses a[:, :r] and b[:r]; the multi-rank loss is a loop over ranks, Σ exp(−s_r)·CE_r + s_r,
with s one learned log-variance per rank value.

`--serve` answers benchmarks.line_worker requests: `setup` loads the initial parameters and batches
the JAX worker wrote, builds the AdamW step eager and under `torch.compile` (inductor) per batch
and writes each one's loss gradients at the initial parameters on the check batch for the parent
to compare; `time` times one of them.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pathlib
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from benchmarks import line_worker
from benchmarks.timing import Policy, time_fn


class NSNLinear(nn.Module):
  """y = (x @ a[:, :r]) @ b[:r] + bias; nsn_jax's from-scratch init (harmonic row scales)."""

  def __init__(self, d_in: int, d_out: int, max_rank: int):
    super().__init__()
    row_var = torch.tensor([1.0 / i for i in range(1, max_rank + 1)])
    self.a = nn.Parameter(torch.randn(d_in, max_rank) / math.sqrt(d_in))
    self.b = nn.Parameter(torch.randn(max_rank, d_out) * (row_var / row_var.sum()).sqrt()[:, None])
    self.bias = nn.Parameter(torch.zeros(d_out))

  def forward(self, x: torch.Tensor, rank: int) -> torch.Tensor:
    """x: (B, d_in) → (B, d_out) at the static rank `rank`."""
    return (x @ self.a[:, :rank]) @ self.b[:rank] + self.bias


class NSNMLP(nn.Module):
  """Flatten → NSN hidden layers with ReLU → dense classifier, as nsn_jax.models.mlp.NSNMLP."""

  def __init__(self, input_dim: int, hidden: list[int], num_classes: int, max_rank: int):
    super().__init__()
    widths = [input_dim, *hidden]
    self.hidden = nn.ModuleList(NSNLinear(a, b, max_rank) for a, b in zip(widths, widths[1:]))
    self.head = nn.Linear(widths[-1], num_classes)
    self.log_var = nn.Parameter(torch.zeros(max_rank))  # s_r for rank r at index r − 1

  def forward(self, x: torch.Tensor, rank: int, first: torch.Tensor | None = None) -> torch.Tensor:
    """x: (B, ...) images → logits (B, num_classes); `first`: the first layer's output at
    `rank`, when it was computed already."""
    x = x.flatten(1)
    for i, layer in enumerate(self.hidden):
      x = F.relu(first if i == 0 and first is not None else layer(x, rank))
    return self.head(x)

  def multi_rank_loss(self, x: torch.Tensor, labels: torch.Tensor, ranks: list[int], shared=False):
    """Σ_r exp(−s_r)·CE_r + s_r, one forward pass per rank. `shared`: the first layer, whose
    input every rank shares, at every rank from one product (prefix sums over rank segments, as
    nsn_jax.rank_sharing does)."""
    firsts = self.first_layer_outputs(x.flatten(1), ranks) if shared else {}
    loss = 0.0
    for r in ranks:
      s = self.log_var[r - 1]
      loss = loss + torch.exp(-s) * F.cross_entropy(self(x, r, firsts.get(r)), labels) + s
    return loss

  def first_layer_outputs(self, x: torch.Tensor, ranks: list[int]) -> dict[int, torch.Tensor]:
    """{r: the first layer's output at rank r}: h = x a[:, :max], then y_r += h_seg b_seg."""
    layer, ascending = self.hidden[0], sorted(ranks)
    h = x @ layer.a[:, : ascending[-1]]
    y, start, outputs = layer.bias, 0, {}
    for r in ascending:
      y = y + h[:, start:r] @ layer.b[start:r]
      outputs[r], start = y, r
    return outputs


def _inference_rows(what: str, forward, inputs: dict[int, torch.Tensor], ranks, policy):
  rows = []
  with torch.inference_mode():
    for batch, x in inputs.items():
      for rank in ranks:
        timing = time_fn(lambda: forward(x, rank), policy)
        rows.append(
          {
            "what": what,
            "batch": batch,
            "rank": rank,
            "latency_s": timing.median_s,
            "latency_min_s": timing.min_s,
          }
        )
  return rows


def run(spec: dict) -> dict:
  torch.manual_seed(0)
  policy = Policy(**spec["policy"])
  layer_spec, mlp_spec = spec["layer"], spec["mlp"]

  layer = NSNLinear(layer_spec["d"], layer_spec["d"], layer_spec["max_rank"])
  rows = _inference_rows(
    "layer",
    layer,
    {b: torch.randn(b, layer_spec["d"]) for b in layer_spec["batches"]},
    layer_spec["ranks"],
    policy,
  )

  model = NSNMLP(
    mlp_spec["input_dim"], mlp_spec["hidden"], mlp_spec["num_classes"], mlp_spec["max_rank"]
  )
  rows += _inference_rows(
    "mlp",
    model,
    {b: torch.rand(b, *mlp_spec["image_shape"]) for b in mlp_spec["batches"]},
    mlp_spec["ranks"],
    policy,
  )

  # The first layer's factor matmul alone, on a contiguous prefix: the BLAS call it makes.
  with torch.inference_mode():
    for batch in mlp_spec["batches"]:
      x = torch.rand(batch, mlp_spec["input_dim"])
      for rank in mlp_spec["matmul_ranks"]:
        a = torch.randn(mlp_spec["input_dim"], rank)
        timing = time_fn(lambda: x @ a, policy)
        rows.append(
          {
            "what": "mlp_matmul",
            "batch": batch,
            "rank": rank,
            "latency_s": timing.median_s,
            "latency_min_s": timing.min_s,
          }
        )

  return {
    "torch_version": torch.__version__,
    "torch_threads": torch.get_num_threads(),
    "rows": rows,
  }


# The train step, served (`--serve`): per (name "SIDE:VARIANT", batch) the step `setup` built.
_SERVED: dict[tuple[str, int], object] = {}
# eager and torch.compile of the plain loop over ranks, and torch.compile with the first layer
# shared across ranks (`NSNMLP.multi_rank_loss(shared=True)`), nsn_jax's own algorithm.
VARIANTS = ("eager", "compile", "compile_shared")


def canonical_names(model: NSNMLP) -> dict[str, tuple[nn.Parameter, bool]]:
  """{the JAX side's name ("model/hidden/0/a"): (parameter, stored transposed)}: nn.Linear keeps
  its weight as (out, in), nnx.Linear its kernel as (in, out)."""
  names = {}
  for name, parameter in model.named_parameters():
    if name == "log_var":
      names["rank_weights/log_var"] = (parameter, False)
    else:
      key = "model/" + name.replace(".", "/").replace("head/weight", "head/kernel")
      names[key] = (parameter, name == "head.weight")
  return names


def _load(model: NSNMLP, arrays) -> NSNMLP:
  """`model` with the parameters `arrays` (init.npz of the JAX worker) holds."""
  with torch.no_grad():
    for key, (parameter, transposed) in canonical_names(model).items():
      value = torch.from_numpy(np.array(arrays[key]))
      parameter.copy_(value.T if transposed else value)
  return model


def _trainer(model: NSNMLP, spec: dict, x, labels, variant: str):
  """(loss_fn(x, labels) → the multi-rank loss, step() → one AdamW step on `x`, `labels`),
  per `variant` (VARIANTS): under `torch.compile` the loss (forward and backward, AOTAutograd
  + inductor) and the optimizer step are each one compiled graph, the ranks static."""
  optimizer = torch.optim.AdamW(
    model.parameters(), lr=spec["learning_rate"], weight_decay=spec["weight_decay"]
  )
  shared = variant.endswith("_shared")
  loss_fn = lambda x, labels: model.multi_rank_loss(x, labels, spec["ranks"], shared)
  update = optimizer.step
  if variant.startswith("compile"):
    loss_fn = torch.compile(loss_fn, dynamic=False)
    update = torch.compile(optimizer.step, dynamic=False)

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss_fn(x, labels).backward()
    update()

  return loss_fn, step


def _batch(directory, name: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
  """(images, int64 labels) of DIRECTORY/NAME_BATCH.npz, which the JAX worker wrote."""
  data = np.load(pathlib.Path(directory) / f"{name}_{batch}.npz")
  return torch.from_numpy(data["image"]), torch.from_numpy(data["label"]).long()


def _serve_variant(
  model: NSNMLP, spec: dict, batch: int, variant: str, directory, side: str
) -> dict:
  """Builds one variant's step at `batch`, writes its loss's gradients at the initial parameters
  on the check batch to DIRECTORY/grads_SIDE:VARIANT_BATCH.npz, then runs one step."""
  model = copy.deepcopy(model)
  loss_fn, step = _trainer(model, spec, *_batch(directory, "batch", batch), variant)
  start = time.perf_counter()
  loss = loss_fn(*_batch(directory, "check", batch))
  loss.backward()
  grads = {
    key: (p.grad.T if transposed else p.grad).numpy()
    for key, (p, transposed) in canonical_names(model).items()
  }
  np.savez(pathlib.Path(directory) / f"grads_{side}:{variant}_{batch}.npz", **grads)
  step()
  _SERVED[f"{side}:{variant}", batch] = step
  return {
    "name": f"{side}:{variant}",
    "batch": batch,
    "loss": loss.item(),
    "first_step_s": time.perf_counter() - start,  # compile time included
  }


def serve_setup(spec: dict, threads: int, directory: str, side: str = "torch") -> dict:
  """Builds the eager and compiled steps at every batch of `spec` on `threads` threads; their
  names start with `side` (the worker's name in the comparison)."""
  torch.set_num_threads(threads)
  model = NSNMLP(spec["input_dim"], spec["hidden"], spec["num_classes"], spec["max_rank"])
  _load(model, np.load(pathlib.Path(directory) / "init.npz"))
  contenders = [
    _serve_variant(model, spec, batch, variant, directory, side)
    for batch in spec["batches"]
    for variant in VARIANTS
  ]
  return {
    "contenders": contenders,
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
    "cpus": sorted(os.sched_getaffinity(0)),
    "os_threads": line_worker.process_threads(),
  }


def serve_time(name: str, batch: int, policy: dict) -> dict:
  """Times the step `name` ("SIDE:VARIANT") at `batch` that `serve_setup` built."""
  return line_worker.timed(_SERVED[name, batch], policy)


if __name__ == "__main__":
  if sys.argv[1:] == ["--serve"]:
    line_worker.serve({"setup": serve_setup, "time": serve_time})
  else:
    print(json.dumps(run(json.load(sys.stdin))))
