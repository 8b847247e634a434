"""Smoke test of the benchmark suite at size tiny: it runs, and its JSON is complete and sane.

No timing assertions: speed is what the benchmarks measure, not what the tests check. The torch
suite needs its own venv, absent in CI; only its skip path is tested.
"""

import json
import math

import pytest

from benchmarks import run, torch_ref

JAX_SUITES = ("layer", "model", "train", "compile")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  """The JSON file a tiny run of every JAX suite writes, read back from disk."""
  out = tmp_path_factory.mktemp("bench") / "tiny.json"
  run.main(["--suite", ",".join(JAX_SUITES), "--size", "tiny", "--out", str(out)])
  return json.loads(out.read_text())


def _positive(value):
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_report_records_environment_and_every_suite(report):
  env = report["environment"]
  for key in ("device_kind", "platform", "jax", "jaxlib", "flax", "python", "cpu_count"):
    assert env[key], key
  assert env["command"].startswith("python -m benchmarks.run") and "--size tiny" in env["command"]
  assert report["size"] == "tiny" and set(report["suites"]) == set(JAX_SUITES)
  for suite in report["suites"].values():
    assert suite["rows"] and not suite["skipped"]
    for line in suite["summary"]:
      assert math.isfinite(line["value"]), line


def _gar_excess_bound(layers, rows: int) -> int:
  """What XLA counts for the GAR layers of a deployed program beyond the analytic FLOPs, at most:
  per row the pivot add (r) and the gather's per-element index check and fill-mode select
  (2·d_in); per call the gather's index normalisation (≤ 32 ops per index). `layers`:
  [d_in, d_out, rank, form] per deployed layer."""
  return sum(
    rows * (rank + 2 * d_in) + 32 * d_in for d_in, _, rank, form in layers if form == "gar"
  )


def _assert_flops_explained(row, rows: int, elementwise_min: int, elementwise_max: int):
  """XLA's count = the analytic count + elementwise work the analytic count leaves out
  (activations, norms, softmax; GAR's gather and add), each within its bounds."""
  excess = row["xla_flops"] - row["analytic_flops"]
  gar = _gar_excess_bound(row.get("layers", []), rows)
  assert elementwise_min <= excess <= elementwise_max + gar, (row, excess, gar)


def test_layer_rows_cover_the_grid_and_match_xla_flops(report):
  rows = report["suites"]["layer"]["rows"]
  ranks = {2, 4, 8, 16, 24, 32}
  assert {row["rank"] for row in rows if row["kind"] == "nsn"} == ranks
  assert {(row["policy"], row["rank"]) for row in rows if row["kind"] == "deployed"} == {
    (policy, r) for policy in ("cheapest", "matmul") for r in ranks
  }
  assert {row["kind"] for row in rows} == {"nsn", "dense", "matmul", "deployed"}
  for row in rows:
    assert _positive(row["latency_s"]) and _positive(row["flops_per_s"]), row
    # A deployed layer's FLOPs: GAR below min(d_in, d_out) = 64 under "cheapest"; under
    # "matmul" factorised below the break-even rank 32, folded dense at it.
    if row["kind"] == "deployed":
      assert (
        row["form"]
        == {"cheapest": "gar", "matmul": ("factorised" if row["rank"] < 32 else "dense")}[
          row["policy"]
        ]
      ), row
    layers = [[64, 64, row["rank"], row["form"]]] if row["kind"] == "deployed" else []
    _assert_flops_explained({**row, "layers": layers}, row["batch"], 0, 0)
  assert [row["vs_dense"] for row in rows if row["kind"] == "dense"] == [1.0]
  assert [row["vs_matmul"] for row in rows if row["kind"] == "matmul"] == [1.0]


def test_model_rows_per_rank_and_batch(report):
  rows = report["suites"]["model"]["rows"]
  mlp = [row for row in rows if row["model"] == "mlp"]
  for kind, policies in (("nsn", {None}), ("deployed", {"cheapest", "matmul"})):
    assert {(row["batch"], row["rank"], row["policy"]) for row in mlp if row["kind"] == kind} == {
      (b, r, p) for b in (1, 8) for r in (1, 2, 4, 8) for p in policies
    }
  for row in mlp:
    assert _positive(row["latency_s"]), row
    # XLA also counts the ReLUs of the smoke MLP's one hidden layer (32 wide), at most once each.
    _assert_flops_explained(row, row["batch"], 0, row["batch"] * 32)
  decoder = [row for row in rows if row["model"] == "decoder"]
  assert [row["kind"] for row in decoder] == ["dense"] + ["nsn"] * 4 + ["deployed"] * 8
  assert {row["rank"] for row in decoder if row["kind"] != "dense"} == {4, 8, 16, 32}
  # The tiny decoder (dim 32, 2 blocks, 4 heads of 8, 2 KV heads, ffn 64) on 16 tokens: per
  # token the elements of its norms, RoPE, attention scores, SwiGLU gate and residual adds;
  # XLA counts each at least once and, with the softmax's steps, at most 8 times.
  elements = 2 * (2 * 32 + (4 + 2) * 8 + 4 * 16 + 64 + 2 * 32) + 32
  for row in decoder:
    assert _positive(row["latency_s"]) and row["seq_len"] == 16, row
    _assert_flops_explained(row, 16, 16 * elements, 16 * 8 * elements)


def test_train_rows_per_model_strategy_and_rank_set(report):
  rows = report["suites"]["train"]["rows"]
  multi = ("vmap_masked", "loop_static", "bucketed")
  halvings = {"mlp": 8}  # the anchor R leads, then R/2, R/4 (size tiny: the demo MLP only)
  assert sorted((row["model"], row["strategy"], tuple(row["ranks"])) for row in rows) == sorted(
    [(model, "single_static", (r,)) for model, r in halvings.items()]
    + [
      (model, strategy, tuple(r // 2**i for i in range(k)))
      for model, r in halvings.items()
      for strategy in multi
      for k in (1, 2, 4)
    ]
    + [("mlp", strategy, (8, 4, 2)) for strategy in multi]  # the smoke config's own set
  )
  for row in rows:
    assert _positive(row["steps_per_s"]) and _positive(row["program_bytes"]), row
    assert row["batch"] == 32 and row["memory_source"]
    assert (row["buckets"] is None) == (row["strategy"] != "bucketed"), row


def test_compile_warm_run_reads_every_rank_from_disk(report):
  suite = report["suites"]["compile"]
  assert [row["rank"] for row in suite["rows"]] == list(range(1, 9))
  for row in suite["rows"]:
    assert all(_positive(row[f"compile_{mode}_s"]) for mode in ("off", "cold", "warm")), row
    assert row["warm_hit"], row
  (disk,) = [line for line in suite["summary"] if line["metric"].startswith("fraction of rank")]
  assert disk["met"] is True


def test_torch_suite_without_its_venv_is_skipped_with_the_setup_command(
  tmp_path, monkeypatch, capsys
):
  monkeypatch.setattr(torch_ref, "PYTHON", tmp_path / "no-venv" / "python")
  out = tmp_path / "torch.json"
  report = run.main(["--suite", "torch", "--size", "tiny", "--out", str(out)])
  assert torch_ref.SETUP in capsys.readouterr().out
  assert report["suites"] == {"torch": json.loads(out.read_text())["suites"]["torch"]}
  assert report["suites"]["torch"]["skipped"] and not report["suites"]["torch"]["rows"]


def test_sharded_step_benchmark_reports_memory_and_collectives(tiny_gguf, data_dir, tmp_path):
  from benchmarks import sharded_step

  out = tmp_path / "sharded.json"
  argv = ["--config", "configs/smollm2_lm.py:smoke", "--model_path", tiny_gguf]
  argv += ["--data_dir", data_dir, "--meshes", "fsdp=2,tensor=2", "--remat", "none,block"]
  argv += ["--min_size", "2048", "--out", str(out)]  # the test vocabulary (50) stays replicated
  sharded_step.main(argv)
  report = json.loads(out.read_text())
  assert report["environment"]["command"].startswith("python -m benchmarks.sharded_step")
  rows = report["rows"]
  assert [r["remat"] for r in rows] == ["none", "block"]
  for row in rows:
    assert _positive(row["state_mib"]) and _positive(row["temp_mib"])
    assert row["all-gather"] > 0 and row["all-to-all"] == 0  # sharded, and no resharding
  # Block remat keeps each block's input only: the activations saved for the backward pass.
  assert 0 < rows[1]["saved_mib"] < rows[0]["saved_mib"] / 2


def test_generation_benchmark_counts_compiles_per_prompt_length(tmp_path):
  from benchmarks import generation

  out = tmp_path / "generation.json"
  report = generation.main(["--size", "tiny", "--out", str(out), "--torch_python", "/nowhere"])
  assert json.loads(out.read_text())["summary"] == report["summary"]
  calls = {mode: [c for c in report["buckets"] if c["mode"] == mode] for mode in report["summary"]}
  assert [c["prompt_tokens"] for c in calls["pow2"]] == list(generation.LENGTHS["tiny"])
  # Every new length compiles a prefill without buckets; the first call also compiles the step.
  assert [c["compiles"] for c in calls["per_length"]] == [2, 1, 1]
  assert report["summary"]["pow2"]["compiles"] <= report["summary"]["per_length"]["compiles"]
  assert report["tokens_per_s"] == [] and "skipped: no /nowhere" in report["notes"][0]
  assert report["environment"]["cpu_model"]
