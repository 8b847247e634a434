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


def test_layer_rows_cover_the_grid_and_match_xla_flops(report):
  rows = report["suites"]["layer"]["rows"]
  assert {row["rank"] for row in rows if row["kind"] == "nsn"} == {2, 4, 8, 16, 24, 32}
  assert {row["kind"] for row in rows} == {"nsn", "dense", "matmul"}
  for row in rows:
    assert _positive(row["latency_s"]) and _positive(row["flops_per_s"]), row
    assert abs(row["xla_flops"] - row["analytic_flops"]) <= 0.1 * row["analytic_flops"], row
  assert [row["vs_dense"] for row in rows if row["kind"] == "dense"] == [1.0]
  assert [row["vs_matmul"] for row in rows if row["kind"] == "matmul"] == [1.0]


def test_model_rows_per_rank_and_batch(report):
  suite = report["suites"]["model"]
  nsn = [row for row in suite["rows"] if row["kind"] == "nsn"]
  assert {(row["batch"], row["rank"]) for row in nsn} == {(b, r) for b in (1, 8)
                                                          for r in (1, 2, 4, 8)}
  for row in suite["rows"]:
    assert _positive(row["latency_s"]), row
    # XLA also counts the ReLUs, which the analytic count leaves out.
    assert abs(row["xla_flops"] - row["analytic_flops"]) <= 0.1 * row["analytic_flops"], row
  assert any("SmolLM2" in note for note in suite["notes"])


def test_train_rows_per_strategy_and_rank_count(report):
  rows = report["suites"]["train"]["rows"]
  assert {(row["strategy"], row["k"]) for row in rows} == {
      ("vmap_masked", 1), ("vmap_masked", 2), ("vmap_masked", 4), ("loop_static", 1),
      ("loop_static", 2), ("loop_static", 4), ("single_static", 1)}
  for row in rows:
    assert _positive(row["steps_per_s"]) and _positive(row["program_bytes"]), row
    assert len(row["ranks"]) == row["k"] and row["ranks"][0] == 8  # the anchor leads
    assert row["memory_source"]


def test_compile_warm_run_reads_every_rank_from_disk(report):
  suite = report["suites"]["compile"]
  assert [row["rank"] for row in suite["rows"]] == list(range(1, 9))
  for row in suite["rows"]:
    assert all(_positive(row[f"compile_{mode}_s"]) for mode in ("off", "cold", "warm")), row
    assert row["warm_hit"], row
  (disk,) = [line for line in suite["summary"] if line["metric"].startswith("fraction of rank")]
  assert disk["met"] is True


def test_torch_suite_without_its_venv_is_skipped_with_the_setup_command(
    tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(torch_ref, "PYTHON", tmp_path / "no-venv" / "python")
  out = tmp_path / "torch.json"
  report = run.main(["--suite", "torch", "--size", "tiny", "--out", str(out)])
  assert torch_ref.SETUP in capsys.readouterr().out
  assert report["suites"] == {"torch": json.loads(out.read_text())["suites"]["torch"]}
  assert report["suites"]["torch"]["skipped"] and not report["suites"]["torch"]["rows"]
