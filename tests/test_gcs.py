"""A run whose workdir is a gs:// bucket: train, resume, sweep, export and restore read and write
only through etils.epath (tests/fakes.py: FakeGcs serves gs:// from a local directory)."""

import json

from fakes import FakeGcs
import pytest

from nsn_jax.export import export
from nsn_jax.restore import restore_model
from nsn_jax.sweep import run_sweep
from nsn_jax.train_lib import train_and_evaluate


def test_train_eval_and_export_on_a_gs_workdir(smoke_config, tmp_path, monkeypatch):
  bucket = tmp_path / "gcs"
  with FakeGcs(bucket, monkeypatch):
    final = train_and_evaluate(smoke_config, "gs://runs/smoke", metrics_dir=str(tmp_path / "m"))
    assert (bucket / "runs" / "smoke" / "checkpoints" / "20").is_dir()
    # Metrics are written locally and copied whole into the bucket for TensorBoard.
    mirrored = bucket / "runs" / "smoke" / "metrics"
    lines = (mirrored / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 20
    assert list((mirrored / "tensorboard").iterdir())
    rows = run_sweep("gs://runs/smoke", "2,8", verbose=False)
    assert rows[-1].loss == pytest.approx(final["eval/rank_8/loss"], rel=1e-5)
    sweep = json.loads((bucket / "runs/smoke/eval/step_20/sweep.json").read_text())
    assert [r["rank"] for r in sweep] == [2, 8]
    assert (bucket / "runs/smoke/eval/step_20/frontier.png").stat().st_size > 10_000

    export("gs://runs/smoke", "gs://runs/smoke_r4", rank=4)
    exported = restore_model("gs://runs/smoke_r4")
    assert exported.metadata["export"]["source"] == "gs://runs/smoke"
    with pytest.raises(ValueError, match="already exists"):
      export("gs://runs/smoke", "gs://runs/smoke_r4", rank=4)
    # A dense twin on gs:// is what model.init_from restores: the same restore_model.
    assert restore_model("gs://runs/smoke").step == 20
    smoke_config.train.steps = 24  # resumed from the bucket's step 20
    train_and_evaluate(smoke_config, "gs://runs/smoke", metrics_dir=str(tmp_path / "m"))
    assert restore_model("gs://runs/smoke").step == 24
