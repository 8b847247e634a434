"""Smoke test of benchmarks/accelerator.py at size tiny (on the CPU): it runs, and its JSON holds
every row it promises with sane numbers. No speed is asserted, only what must hold anywhere:
positive finite latencies and FLOPs, fewer XLA FLOPs at a lower rank, no MFU without a peak."""

import json
import math
import types

import pytest

from benchmarks import accelerator


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  """The JSON file a tiny run writes, read back from disk."""
  out = tmp_path_factory.mktemp("accelerator") / "tiny.json"
  accelerator.main(["--size=tiny", f"--out={out}"])
  return json.loads(out.read_text())


def _positive(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_report_records_the_environment(report):
  env = report["environment"]
  assert env["command"].startswith("python -m benchmarks.accelerator --size=tiny --out=")
  assert env["platform"] == "cpu" and env["device_count"] >= 1
  for key in ("device_kind", "jax", "cpu_model"):
    assert env[key], key
  assert report["size"] == "tiny" and report["compute_dtype"] == "bfloat16"


def test_latency_rows_cover_every_model_and_rank(report):
  rows = report["latency"]
  for setup in accelerator.SETUPS["tiny"]:
    assert report["models"][setup.name]["max_rank"] == setup.max_rank
    mine = [row for row in rows if row["model"] == setup.name]
    assert [(row["kind"], row["rank"]) for row in mine] == [
      ("dense", None),
      *(("nsn", r) for r in setup.ranks),
    ]
    for row in mine:
      assert row["tokens"] == setup.batch * setup.seq_len, row
      for key in ("latency_s", "latency_min_s", "analytic_flops", "xla_flops", "hlo_flops"):
        assert _positive(row[key]), (key, row)
      assert math.isfinite(row["spread"]) and row["spread"] >= 0, row
      # XLA also counts elementwise work (norms, softmax, SwiGLU, RoPE) the analytic count omits.
      assert row["analytic_flops"] <= row["xla_flops"] <= 1.5 * row["analytic_flops"], row
      assert row["peak_fraction"] is None, row
    nsn = [row for row in mine if row["kind"] == "nsn"]
    for lower, higher in zip(nsn, nsn[1:]):
      assert lower["xla_flops"] < higher["xla_flops"], (lower, higher)
      assert lower["analytic_flops"] < higher["analytic_flops"], (lower, higher)


def test_train_rows_have_flops_and_no_mfu_on_cpu(report):
  rows = report["train"]["rows"]
  assert [tuple(row["ranks"]) for row in rows] == list(accelerator.TRAIN["tiny"].rank_sets)
  for row in rows:
    assert row["k"] == len(row["ranks"]) and row["multi_rank"] == "loop_static", row
    for key in ("step_s", "step_min_s", "xla_flops", "xla_flops_per_s", "tokens_per_s"):
      assert _positive(row[key]), (key, row)
    assert row["mfu"] is None, row
  assert report["peak_bf16_flops"] is None
  assert any("MFU is null" in note for note in report["notes"])


@pytest.mark.parametrize(
  "platform, kind, peak",
  [
    ("gpu", "NVIDIA H100 80GB HBM3", 989e12),
    ("gpu", "NVIDIA H100 PCIe", 756e12),
    ("gpu", "NVIDIA H200", 989e12),
    ("gpu", "NVIDIA A100-SXM4-80GB", 312e12),
    ("tpu", "TPU v4", 275e12),
    ("tpu", "TPU v5 lite", 197e12),
    ("tpu", "TPU v5", 459e12),
    ("tpu", "TPU v6 lite", 918e12),
    ("gpu", "NVIDIA GeForce RTX 4090", None),
    ("cpu", "cpu", None),
  ],
)
def test_peak_table_by_device_kind(platform, kind, peak):
  found, why = accelerator.peak_bf16(types.SimpleNamespace(platform=platform, device_kind=kind))
  assert found == peak and why


def test_a_rank_set_that_would_overrun_the_budget_is_skipped():
  rows = [{"k": 1, "row_s": 40.0}]
  assert accelerator.skip_reason([], (576,), 10.0) is None  # the first always runs in time
  assert accelerator.skip_reason([], (576,), -1.0)  # ... unless the time is already up
  assert accelerator.skip_reason(rows, (576, 133), 90.0) is None
  reason = accelerator.skip_reason(rows, (576, 288, 133, 64), 150.0)  # 4 × 40 s > 150 s
  assert reason.startswith("train ranks [576, 288, 133, 64] skipped: ~160 s expected"), reason
