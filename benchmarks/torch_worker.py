"""The PyTorch eager reference: the NSN layer and MLP, timed on the grid a JSON spec names.

Runs in its own venv, never the project's (benchmarks.torch_ref starts it):
  .venv-torch/bin/python -m benchmarks.torch_worker < spec.json > rows.json
It imports only torch, the standard library and benchmarks.timing (the same timing helper as the
JAX suites). The model mirrors nsn_jax: factors a (d_in, R) and b (R, d_out), rank r uses
a[:, :r] and b[:r]; the multi-rank loss is a loop over ranks, Σ exp(−s_r)·CE_r + s_r, with s
one learned log-variance per rank value.
"""

from __future__ import annotations

import json
import math
import sys

import torch
from torch import nn
from torch.nn import functional as F

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

  def forward(self, x: torch.Tensor, rank: int) -> torch.Tensor:
    """x: (B, ...) images → logits (B, num_classes)."""
    x = x.flatten(1)
    for layer in self.hidden:
      x = F.relu(layer(x, rank))
    return self.head(x)

  def multi_rank_loss(self, x: torch.Tensor, labels: torch.Tensor, ranks: list[int]):
    """Σ_r exp(−s_r)·CE_r + s_r, one forward pass per rank."""
    loss = 0.0
    for r in ranks:
      s = self.log_var[r - 1]
      loss = loss + torch.exp(-s) * F.cross_entropy(self(x, r), labels) + s
    return loss


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
  layer_spec, mlp_spec, train_spec = spec["layer"], spec["mlp"], spec["train"]

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

  optimizer = torch.optim.AdamW(
    model.parameters(), lr=train_spec["learning_rate"], weight_decay=train_spec["weight_decay"]
  )
  x = torch.rand(train_spec["batch"], *mlp_spec["image_shape"])
  labels = torch.randint(0, mlp_spec["num_classes"], (train_spec["batch"],))
  for ranks in train_spec["rank_sets"]:

    def step():
      optimizer.zero_grad(set_to_none=True)
      model.multi_rank_loss(x, labels, ranks).backward()
      optimizer.step()

    timing = time_fn(step, policy)
    rows.append(
      {
        "what": "train",
        "batch": train_spec["batch"],
        "k": len(ranks),
        "ranks": ranks,
        "step_s": timing.median_s,
        "step_min_s": timing.min_s,
      }
    )
  return {
    "torch_version": torch.__version__,
    "torch_threads": torch.get_num_threads(),
    "rows": rows,
  }


if __name__ == "__main__":
  print(json.dumps(run(json.load(sys.stdin))))
