"""The bad-input matrix: every config mistake gets one line naming the field, the value and what
is valid, before any data or weights are read; the CLIs print it without a traceback (exit 2)."""

import os
import subprocess
import sys

import pytest

from configs import cifar10_mlp, default, digits_mlp, minilm_genre, smollm2_genre, smollm2_lm
from nsn_jax import config as config_lib
from nsn_jax.build import check_model_fits
from nsn_jax.config import ConfigError, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (overrides of configs/default.py:smoke, regex the one-line message must match).
MLP_CASES = [
  ({"model.max_rank": 64}, r"model.max_rank=64: valid: 1..32"),  # above the 32-wide layer
  ({"model.max_rank": 0}, r"model.max_rank=0: valid: 1..32"),
  ({"model.max_rank": 4}, r"ranks.fixed=\(8, 4, 2\): \[8\] out of range; valid: .*1..4"),
  ({"model.max_rank": 4, "ranks.fixed": (4, 2)}, r"eval.ranks=\(8, 2\): \[8\] out of range"),
  ({"model.max_rank": 4, "ranks.fixed": ()}, r"eval.ranks=\(8, 2\): \[8\] out of range"),
  ({"ranks.kind": "anchor_variants", "ranks.min_rank": 8}, r"ranks.min_rank=8: valid: 1..7"),
  (
    {"ranks.kind": "anchor_variants", "ranks.min_rank": 4, "ranks.held_out": (2, 5)},
    r"ranks.held_out=\(2, 5\): \[2\] are below ranks.min_rank: never drawn anyway",
  ),
  ({"model.dense": True}, r"eval.ranks=\(8, 2\): a dense model is evaluated as itself"),
  (
    {"model.dense": True, "eval.ranks": (), "train.multi_rank": "bogus"},
    r"train.multi_rank='bogus'",
  ),
  ({"data.train_split": ""}, r"data.train_split='': valid: a TFDS name"),
  ({"data.eval_split": ""}, r"data.eval_split='': valid: a TFDS name"),
  ({"seed": 2**63}, r"seed=9223372036854775808: valid: 0..2147483647"),
  ({"sharding.rules": (("a$", ("fsdp", "model")),)}, r"unknown axes \['model'\]"),
  ({"sharding.rules": (("a$",),)}, r"sharding.rules=.*valid: \(path regex, \(entry"),
  ({"sharding.rules": (("a$", (("fsdp", "fsdp"), None)),)}, r"an axis used twice"),
  ({"sharding.min_size": -1}, r"sharding.min_size=-1: valid: an integer ≥ 0"),
  ({"flexrank.probabilities": (1.0,)}, r"flexrank.probabilities=\(1.0,\): only distillation"),
  ({"ranks.fixed": (8, 8)}, r"ranks.fixed=\(8, 8\): repeated ranks"),
  ({"ranks.fixed": (8, 2.5)}, r"ranks.fixed=\(8, 2.5\): \[2.5\] out of range"),
  ({"ranks.held_out": (3,)}, r"ranks.held_out=\(3,\): with fixed ranks every rank not in "),
  ({"ranks.kind": "sampled"}, r"ranks.kind='sampled': valid: fixed \| anchor_variants"),
  ({"ranks.kind": "anchor_variants", "ranks.min_rank": 9}, r"ranks.min_rank=9: valid: 1..7"),
  (
    {"ranks.kind": "anchor_variants", "ranks.held_out": (8,)},
    r"ranks.held_out=\(8,\): \[8\] out of range; valid: .*1..7 \(R=8 is the anchor\)",
  ),
  (
    {"ranks.kind": "anchor_variants", "ranks.held_out": (2, 3, 4, 5, 6, 7)},
    r"ranks.held_out=.*leaving a rank below R to train",
  ),
  ({"ranks.kind": "anchor_variants", "ranks.curriculum": "cosine"}, r"ranks.curriculum='cosine'"),
  (
    {"ranks.kind": "anchor_variants", "ranks.warmup_fraction": 1.5},
    r"ranks.warmup_fraction=1.5: valid: a number in \[0, 1\]",
  ),
  ({"ranks.kind": "anchor_variants", "ranks.num_variants": 0}, r"ranks.num_variants=0"),
  (
    {"ranks.kind": "anchor_variants", "train.multi_rank": "loop_static"},
    r"train.multi_rank='loop_static'.*anchor_variants",
  ),
  (
    {"ranks.kind": "anchor_variants", "train.multi_rank": "bucketed"},
    r"train.multi_rank='bucketed': drawn ranks are data.*valid: auto \| vmap_masked with ranks",
  ),
  ({"eval.ranks": (64, 16)}, r"eval.ranks=\(64, 16\): \[64, 16\] out of range; valid: .*1..8"),
  ({"eval.batch_size": 0}, r"eval.batch_size=0: valid: an integer ≥ 1"),
  ({"eval.every": 0}, r"eval.every=0: valid: an integer ≥ 1"),
  ({"train.log_every": 0}, r"train.log_every=0: valid: an integer ≥ 1"),
  ({"train.checkpoint_every": 0}, r"train.checkpoint_every=0: valid: an integer ≥ 1"),
  ({"train.max_to_keep": 0}, r"train.max_to_keep=0: valid: an integer ≥ 1"),
  ({"train.steps": 0}, r"train.steps=0: valid: an integer ≥ 1"),
  ({"train.batch_size": 0}, r"train.batch_size=0: valid: an integer ≥ 1"),
  ({"train.trainable": ()}, r"train.trainable=\(\): valid: a tuple of path regexes"),
  ({"train.trainable": ("(",)}, r"train.trainable='\(': .*valid: Python regular expressions"),
  (
    {"train.multi_rank": "fused"},
    r"train.multi_rank='fused': valid: auto \| bucketed \| loop_static \| vmap_masked",
  ),
  (
    {"optimizer.learning_rate": -1e-3},
    r"optimizer.learning_rate=-0.001: valid: a finite number > 0",
  ),
  ({"optimizer.learning_rate": float("inf")}, r"learning_rate=inf: valid: a finite number > 0"),
  ({"optimizer.learning_rate": float("nan")}, r"optimizer.learning_rate=nan"),
  ({"optimizer.weight_decay": -0.1}, r"optimizer.weight_decay=-0.1: valid: a finite number ≥ 0"),
  ({"optimizer.warmup_steps": 20}, r"warmup_steps=20: valid: 0..19 \(fewer than train.steps=20"),
  ({"model.hidden": (32, True)}, r"model.hidden=\(32, True\): valid: one or more positive"),
  ({"data.eval_examples": -3}, r"data.eval_examples=-3: valid: an integer ≥ 0"),
  ({"data.text_feature": ("text",)}, r"data.text_feature=\('text',\): valid: \(\) and data.seq"),
  ({"ranks.fixed": (4, 2)}, r"ranks.fixed=\(4, 2\): valid: a set including R=8"),
  (
    {"model.max_rank": 1, "ranks.fixed": (1,), "eval.ranks": (), "ranks.kind": "anchor_variants"},
    r"ranks.kind='anchor_variants': anchor_variants draws ranks below R",
  ),
  ({"optimizer.warmup_steps": -1}, r"optimizer.warmup_steps=-1: valid: 0..19"),
  ({"objective.name": "focal"}, r"objective.name='focal': valid: anchor_only \| uniform"),
  ({"objective.logits_weight": -1.0}, r"objective.logits_weight=-1.0"),
  ({"objective.name": "flexrank_distill"}, r"flexrank.budgets=\(\): valid: one or more fractions"),
  (
    {"flexrank.budgets": (0.5,)},
    r"flexrank.budgets=\(0.5,\): valid: \(\) unless a model gets surgery",
  ),
  ({"flexrank.budget_unit": "bytes"}, r"flexrank.budget_unit='bytes': valid: flops \| params"),
  (
    {"model.name": "resnet"},
    r"model.name='resnet': valid: nsn_mlp \| llama_gguf \| hf_decoder \| bert_hf \| custom",
  ),
  ({"model.dtype": "float16"}, r"model.dtype='float16': valid: float32 \| bfloat16"),
  ({"model.hidden": ()}, r"model.hidden=\(\): valid: one or more positive widths"),
  ({"model.hidden": (32, 0)}, r"model.hidden=\(32, 0\)"),
  ({"model.path": "/tmp/x.gguf"}, r"model.path='/tmp/x.gguf': only pretrained models read"),
  ({"model.init_from": "/nowhere/x"}, r"model.init_from='/nowhere/x': not found"),
  (
    {"model.init_from": "runs/x", "model.dense": True, "eval.ranks": ()},
    r"model.init_from='runs/x': a dense twin starts nested runs",
  ),
  ({"task": "segmentation"}, r"task='segmentation': valid: image_classification"),
  ({"task": "text_classification"}, r"task='text_classification': valid: image_classif"),
  ({"data.name": ""}, r"data.name='': valid: a TFDS name, e.g. mnist5k"),
  ({"data.image_shape": (28, 0, 1)}, r"data.image_shape=\(28, 0, 1\): valid: positive sizes"),
  ({"data.num_classes": 1}, r"data.num_classes=1: valid: 2..inf|data.num_classes=1: valid: an"),
  ({"seed": -1}, r"seed=-1: valid: 0..2147483647"),
  ({"mesh.data": 3}, r"mesh=.*'data': 3.*product divides the 8 devices"),
  ({"mesh.data": 0}, r"mesh.data=0: valid: a positive device count, or -1"),
  ({"mesh.data": -1, "mesh.fsdp": -1}, r"mesh=.*at most one axis of -1"),
  ({"train.batch_size": 30}, r"train.batch_size=30: valid: a multiple of the data × fsdp"),
  ({"sharding.rules": (("(", ("fsdp",)),)}, r"sharding.rules='\('"),
]


def _set(config, overrides):
  for dotted, value in overrides.items():
    *sections, field = dotted.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[field] = value
  return config


def test_every_shipped_config_validates():
  for module, variants in (
    (default, (None, "smoke", "dense", "dense,smoke")),
    (cifar10_mlp, (None, "smoke")),
    (digits_mlp, (None, "smoke", "dense")),
    (smollm2_genre, (None, "dense", "smoke", "dense,smoke")),
    (smollm2_lm, (None, "smoke")),
    (minilm_genre, (None, "compare")),
  ):
    for variant in variants:
      validate(module.get_config(variant), num_devices=8)


@pytest.mark.parametrize(
  "overrides,message",
  MLP_CASES,
  ids=[",".join(f"{k}={v}" for k, v in c.items()) for c, _ in MLP_CASES],
)
def test_bad_mlp_config_is_one_clear_line(overrides, message):
  config = _set(default.get_config("smoke"), overrides)
  with pytest.raises(ConfigError, match=message) as error:
    validate(config, num_devices=8)
  text = str(error.value)
  assert "\n" not in text and "valid: " in text and error.value.field in text


DIGITS_CASES = [
  ({"data.image_shape": (28, 28, 1)}, r"data.image_shape=\(28, 28, 1\): valid: \(8, 8, 1\) with"),
  ({"data.num_classes": 3}, r"data.num_classes=3: valid: 10 with data.name='digits'"),
  ({"data.eval_split": "validation"}, r"data.eval_split='validation': valid: train \| test with"),
  (
    {"model.name": "bert_hf", "task": "text_classification"},
    r"task='text_classification': valid: 'image_classification' with data.name='digits'",
  ),
]


@pytest.mark.parametrize("overrides,message", DIGITS_CASES)
def test_bad_digits_config_is_one_clear_line(overrides, message):
  config = _set(digits_mlp.get_config(), overrides)
  with pytest.raises(ConfigError, match=message) as error:
    validate(config, num_devices=8)
  assert "\n" not in str(error.value) and error.value.field in str(error.value)


PRETRAINED_CASES = [
  (
    {"model.max_rank": 4096, "ranks.fixed": (4096, 8)},
    r"model.max_rank=4096: valid: 1..32 \(min\(d_in, d_out\) of ",
  ),
  (
    {"surgery.rules": ("ffn",)},
    r"surgery.rules=\('ffn',\): 'ffn' matches no dense layer; valid: "
    r"presets \(mlp, attention, mlp_and_attention\) or regexes matching layer paths such as ",
  ),
  ({"surgery.rules": ()}, r"surgery.rules=\(\): valid: a tuple of presets \(mlp \| attention"),
  ({"data.text_feature": ()}, r"data.text_feature=\(\): valid: one or more feature names"),
  ({"model.path": "/nowhere/model.gguf"}, r"model.path='/nowhere/model.gguf': not found"),
  ({"model.init_from": "/nowhere/run"}, r"model.init_from='/nowhere/run': not found"),
  ({"surgery.init": "qr"}, r"surgery.init='qr': valid: svd \| activation_aware"),
  ({"surgery.calibration_batches": 0}, r"surgery.calibration_batches=0"),
  ({"data.seq_len": 1}, r"data.seq_len=1: valid: an integer ≥ 2"),
  ({"data.seq_len": None}, r"data.seq_len=None: valid: an integer ≥ 2"),
  ({"task": "image_classification"}, r"task='image_classification': valid: text_classif"),
  ({"task": "language_modelling"}, r"data.num_classes=3: a language model predicts tokens"),
  (
    {"objective.name": "flexrank_distill", "flexrank.budgets": (0.5, 1.5)},
    r"flexrank.budgets=1.5: valid: a number in \(0, 1\]",
  ),
  (
    {"objective.name": "flexrank_distill", "flexrank.budgets": (0.5, 0.5)},
    r"flexrank.budgets=\(0.5, 0.5\): repeated budget",
  ),
  (
    {"objective.name": "flexrank_distill", "flexrank.budgets": (0.5,), "eval.ranks": ()},
    r"model.init_from='': distilling a classifier needs a fine-tuned teacher",
  ),
  (
    {
      "objective.name": "flexrank_distill",
      "flexrank.budgets": (0.5, 0.6),
      "flexrank.probabilities": (1.0,),
      "eval.ranks": (),
      "model.init_from": REPO,
    },
    r"flexrank.probabilities=\(1.0,\): valid: 2 non-negative numbers summing to 1",
  ),
  ({"train.trainable": ("nothing",)}, r"train.trainable=\('nothing',\): 'nothing' matches no"),
  ({"train.trainable": ("mlp/", "haed")}, r"'haed' matches no parameter"),
  ({"surgery.rules": ("mlp", "atention")}, r"'atention' matches no dense layer"),
  ({"train.trainable": ("mlp/.*/kernel",)}, r"'mlp/.\*/kernel' matches no parameter"),
  ({"model.dense": True, "eval.ranks": (), "flexrank.budgets": (0.5,)}, r"flexrank.budgets="),
  (
    {"objective.name": "flexrank_distill", "flexrank.budgets": (0.5,), "model.init_from": REPO},
    r"eval.ranks=\(8, 2\): distillation evaluates its profiles",
  ),
  (
    {"model.dense": True, "eval.ranks": (), "objective.name": "uncertainty_ortho"},
    r"objective.name='uncertainty_ortho': a dense model trains one plain loss",
  ),
]


@pytest.mark.parametrize(
  "overrides,message",
  PRETRAINED_CASES,
  ids=[",".join(f"{k}={v}" for k, v in c.items()) for c, _ in PRETRAINED_CASES],
)
def test_bad_pretrained_config_is_one_clear_line(overrides, message, tiny_gguf):
  config = _set(smollm2_genre.get_config("smoke"), {"model.path": tiny_gguf, **overrides})
  with pytest.raises(ConfigError, match=message) as error:
    validate(config, num_devices=8)
    check_model_fits(config)  # the widths of the layers surgery chooses, from shapes only
  assert "\n" not in str(error.value)


def test_multi_rank_auto_buckets_a_fixed_set_and_masks_drawn_ranks():
  config = default.get_config("smoke")
  assert config.train.multi_rank == "auto" and config_lib.multi_rank(config) == "bucketed"
  config.ranks.kind = "anchor_variants"
  validate(config, num_devices=8)
  assert config_lib.multi_rank(config) == "vmap_masked"
  config.train.multi_rank = "vmap_masked"
  config.ranks.kind = "fixed"
  assert config_lib.multi_rank(config) == "vmap_masked"


def test_a_typo_in_a_config_file_is_named():
  config = default.get_config("smoke")
  config.unlock()
  config.train.stpes = 10
  with pytest.raises(
    ConfigError,
    match=r"train.stpes=10: unknown field; valid: the fields of "
    r"train\. .*steps",
  ):
    validate(config)


def test_old_checkpoint_configs_upgrade():
  """A config saved before R had one name (surgery.max_rank; 0 = dense) still restores."""
  saved = smollm2_genre.get_config("smoke").to_dict()
  saved["surgery"]["max_rank"] = 0
  saved["surgery"]["rules"] = "mlp"  # a string before rules became a tuple
  del saved["model"]["dense"], saved["model"]["max_rank"]
  upgraded = config_lib.from_json(saved)
  assert upgraded.model.dense and "max_rank" not in upgraded.surgery
  assert upgraded.surgery.rules == ("mlp",)
  saved["surgery"]["max_rank"] = 16
  upgraded = config_lib.from_json(saved)
  assert upgraded.model.max_rank == 16 and not upgraded.model.dense
  validate(upgraded, restoring=True)


def _start(*args) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, *args],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env={**os.environ, "PYTHONPATH": REPO},
  )


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
  stdout, stderr = proc.communicate(timeout=300)
  return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_clis_print_one_line_and_exit_2_before_any_work(tmp_path):
  """Through the real CLIs: the README's own example, an unknown field, a bad value, a bad
  flag, a missing checkpoint, an export budget; nothing written to the workdir."""
  cases = [
    (
      [
        "train.py",
        "--config=configs/default.py:smoke",
        f"--workdir={tmp_path}/a",
        "--config.model.max_rank=4",
      ],
      "ranks.fixed=(8, 4, 2)",
    ),
    (
      [
        "train.py",
        "--config=configs/default.py:smoke",
        f"--workdir={tmp_path}/b",
        "--config.model.max_rnak=4",
      ],
      "max_rnak",
    ),
    (
      [
        "train.py",
        "--config=configs/default.py:smoke",
        f"--workdir={tmp_path}/c",
        "--config.train.log_every=0",
      ],
      "train.log_every=0: valid: an integer ≥ 1",
    ),
    (["train.py", "--config=configs/nowhere.py", f"--workdir={tmp_path}/d"], "nowhere.py"),
    (
      [
        "train.py",
        "--config=configs/default.py:smoke",
        f"--workdir={tmp_path}/d",
        "--config.model.max_rank=abc",
      ],
      "--config.model.max_rank=abc",
    ),  # a type, at parsing
    (["eval.py", f"--workdir={tmp_path}/e"], "no checkpoint in"),
    (["eval.py", f"--workdir={tmp_path}/e", "--batch_size=0"], "batch_size"),
    (
      ["-m", "nsn_jax.export", f"--workdir={tmp_path}/e", "--budget=2", f"--out={tmp_path}/x"],
      "--budget='2': [2.0] are not fractions",
    ),
  ]
  # All at once: each is mostly the interpreter and JAX starting, which overlaps on 2 cores.
  running = [(args, message, _start(*args)) for args, message in cases]
  for args, message, running_proc in running:
    proc = _finish(running_proc)
    assert proc.returncode == 2, (args, proc.stderr[-2000:])
    assert message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) <= 2, (args, proc.stderr)
  assert not any(p.name in "abcd" for p in tmp_path.iterdir())


def test_the_readme_example_changing_r_validates():
  """`--config.model.max_rank=32 --config.ranks.fixed="(32,16,8,4)"` on the demo config: its
  default eval ranks follow R (R, R/4, R/16) instead of naming ranks above it."""
  config = _set(default.get_config(), {"model.max_rank": 32, "ranks.fixed": (32, 16, 8, 4)})
  validate(config, num_devices=8)
  assert config_lib.eval_ranks(config) == (32, 8, 2)
  assert config_lib.eval_ranks(default.get_config()) == (64, 16, 4)
