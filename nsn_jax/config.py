"""The one config schema: every field, its default, and `validate`, run before any work.

`defaults()` holds every field any model family reads, so code reads `config.a.b` and never
`config.get("b", fallback)`; `configs/*.py` start from it and change what they need. `validate`
checks a config against the schema and itself (ranks against R, budgets, intervals, ...) and
raises `ConfigError`, whose one-line message names the field, the value and what is valid.
train.py, eval.py, the export and `restore_model` all call it before reading data or weights.

R has one name, `model.max_rank`: the NSN MLP's rank, or the rank surgery gives a pretrained
model's chosen layers. `model.dense=True` is the explicit dense mode: the same model with plain
dense layers (the baseline twin), trained with one loss and evaluated as one model, not a rank.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import sys
from typing import Any

from etils import epath
import ml_collections
from ml_collections import config_dict

from nsn_jax import remat

MODELS = ("nsn_mlp", "llama_gguf", "hf_decoder", "bert_hf", "custom")
PRETRAINED = ("llama_gguf", "hf_decoder", "bert_hf")
DECODERS = ("llama_gguf", "hf_decoder")
SURGERY = (*PRETRAINED, "custom")  # families whose NSN layers come from surgery on dense ones
FREE_FORM = ("model.kwargs",)  # sections whose fields the user names (a factory's arguments)
TASKS = ("image_classification", "text_classification", "language_modelling")
OBJECTIVES = (
  "anchor_only",
  "uniform",
  "uncertainty",
  "uncertainty_logits",
  "uncertainty_ortho",
  "flexrank_distill",
)
DISTILL = "flexrank_distill"
DTYPES = ("float32", "bfloat16")
SURGERY_PRESETS = ("mlp", "attention", "mlp_and_attention")
MESH_AXES = ("data", "fsdp", "tensor")  # nsn_jax.sharding.AXES, kept here without importing jax
MULTI_RANK = ("auto", "bucketed", "loop_static", "vmap_masked")


class ConfigError(ValueError):
  """A config value outside what is valid: `field=value: problem; valid: ...`, one line."""

  def __init__(self, field: str, value: Any, valid: str, problem: str = ""):
    self.field, self.value, self.valid = field, value, valid
    shown = value if isinstance(value, (int, float, str, bool, type(None))) else tuple(value)
    super().__init__(f"{field}={shown!r}: {problem + '; ' if problem else ''}valid: {valid}")


def defaults() -> ml_collections.ConfigDict:
  """Every field with its default: the offline MNIST-digits NSN MLP (configs/default.py)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # parameter init, data order and rank draws
  c.task = "image_classification"  # | text_classification | language_modelling
  _data_and_model(c)
  _method(c)
  _training(c)
  return c


def _data_and_model(c: ml_collections.ConfigDict) -> None:
  """data, model, surgery."""
  c.data = ml_collections.ConfigDict()
  # a TFDS dataset (mnist5k and shakespeare/* are built offline), digits (scikit-learn's 8×8
  # digits, built in) or npz:PATH (your arrays, nsn_jax.save_arrays)
  c.data.name = "mnist5k"
  c.data.data_dir = config_dict.placeholder(str)  # None: TFDS's default (~/tensorflow_datasets)
  c.data.image_shape = (28, 28, 1)  # image tasks: must match the dataset
  c.data.num_classes = 10  # classification; None for language modelling
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.cache = True  # hold the train split in host memory (each host holds all of it)
  c.data.text_feature = ()  # text tasks: the feature(s) tokenised, e.g. ("text",)
  c.data.seq_len = config_dict.placeholder(int)  # text tasks: tokens per example
  c.data.eval_examples = 0  # a fixed random cap on the eval split; 0 = all

  c.model = ml_collections.ConfigDict()
  c.model.name = "nsn_mlp"  # | llama_gguf (GGUF file) | bert_hf (Hugging Face BERT directory)
  # | hf_decoder (Hugging Face Llama / Mistral / Qwen2 / Gemma directory, given as model.path)
  # | custom: your own Flax NNX model, built by model.factory(**model.kwargs, rngs=nnx.Rngs(seed))
  c.model.factory = ""  # custom: "package.module:callable", imported from sys.path or the cwd
  c.model.kwargs = ml_collections.ConfigDict()  # custom: the factory's keyword arguments
  c.model.max_rank = 64  # R: the NSN MLP's rank (64 < both demo layers' break-even
  # ranks, 193 and 128), or the rank surgery gives
  c.model.dense = False  # True: plain dense layers (the baseline twin), no ranks
  c.model.hidden = (256, 256)  # nsn_mlp: hidden widths
  c.model.dtype = "float32"  # computation dtype (parameters stay float32)
  c.model.path = ""  # pretrained file; "": the offline SmolLM2 / MiniLM
  c.model.init_from = ""  # a dense twin's workdir (model.dense=True) to start surgery from

  c.surgery = ml_collections.ConfigDict()  # pretrained models: which layers become NSN layers
  c.surgery.rules = ("mlp",)  # presets (mlp, attention, mlp_and_attention) and/or regexes
  c.surgery.init = "svd"  # | activation_aware (FlexRank's whitened SVD)
  c.surgery.calibration_batches = 4  # training batches recorded for activation-aware init


def _method(c: ml_collections.ConfigDict) -> None:
  """objective, flexrank, ranks: what each step trains and how losses combine."""
  c.objective = ml_collections.ConfigDict()
  c.objective.name = "uncertainty"  # one of OBJECTIVES; flexrank_distill needs flexrank.budgets
  c.objective.logits_weight = 1.0  # uncertainty_logits: weight of the KL to the anchor rank
  c.objective.ortho_weight = 0.01  # uncertainty_ortho: weight of the orthogonality penalty

  c.flexrank = ml_collections.ConfigDict()  # docs/flexrank.md (pretrained models with surgery)
  c.flexrank.budgets = ()  # fractions of the dense model; () = no profiles
  c.flexrank.budget_unit = "flops"  # flops (whole forward pass) | params (parameter count)
  c.flexrank.probabilities = ()  # α_k per budget for flexrank_distill; () = uniform

  c.ranks = ml_collections.ConfigDict()  # which ranks each step trains (not in dense mode)
  c.ranks.kind = "fixed"  # fixed (ranks.fixed every step) | anchor_variants (paper)
  c.ranks.fixed = ()  # kind fixed: () = R, the powers of two below it down to 16, 8, 7, ..., 1
  c.ranks.min_rank = 1  # anchor_variants: smallest rank drawn after warm-up
  c.ranks.num_variants = 1  # anchor_variants: ranks drawn per step besides R
  c.ranks.curriculum = "linear"  # anchor_variants: linear | step | none
  c.ranks.warmup_fraction = 0.3  # anchor_variants: share of training the range widens over
  c.ranks.num_stages = 4  # anchor_variants, curriculum step: jumps of the range
  c.ranks.held_out = ()  # anchor_variants: never drawn; reported as held out


def _training(c: ml_collections.ConfigDict) -> None:
  """mesh, sharding, train, optimizer, eval."""
  c.mesh = ml_collections.ConfigDict()  # device axes; -1 = all remaining devices
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.sharding = ml_collections.ConfigDict()
  # ((path regex, (entry, ...)), ...), an entry per dimension: None, an axis or a tuple of axes;
  # () = the defaults (nsn_jax/sharding.py: Megatron-style fsdp + tensor)
  c.sharding.rules = ()
  c.sharding.min_size = 1024  # elements; smaller parameters stay replicated

  c.train = ml_collections.ConfigDict()
  c.train.steps = 3000
  c.train.batch_size = 128  # global; divisible by the data × fsdp devices
  c.train.log_every = 100
  c.train.checkpoint_every = 1000
  c.train.max_to_keep = 3
  c.train.trainable = ("",)  # path regexes of the parameters that train; "" = all
  # How the step runs its ranks (`multi_rank`): auto = bucketed for fixed ranks, vmap_masked for
  # drawn ones | bucketed (buckets of similar ranks, each vmapped at its widest rank's width; on
  # CPU one rank per bucket, measured fastest) | loop_static (one rank per bucket everywhere) |
  # vmap_masked (every rank masked at full width R)
  c.train.multi_rank = "auto"
  # Rematerialisation: none | block (each model block recomputed in the backward pass, keeping
  # what remat_policy, a jax.checkpoint_policies name, saves): trades compute for activations.
  c.train.remat = "none"
  c.train.remat_policy = "nothing_saveable"
  # Language modelling scores this many positions at a time (0: the whole sequence): the
  # (batch, positions, vocabulary) logits of one chunk exist at once, recomputed in the backward
  # pass, instead of every position's for every trained rank.
  c.train.loss_chunk = 128

  c.optimizer = ml_collections.ConfigDict()  # AdamW, linear warm-up then cosine decay
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 0.1  # 4,000 training digits: an unregularised MLP overfits

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 1000  # steps between evaluations during training
  c.eval.ranks = ()  # ranks evaluated during training; () = R, R/4, R/16
  c.eval.batch_size = 500


def from_json(saved: dict) -> ml_collections.ConfigDict:
  """A checkpoint's saved config on top of `defaults()` (fields added since are filled in;
  `surgery.max_rank` of checkpoints written before R had one name becomes model.max_rank /
  model.dense)."""
  saved = json.loads(json.dumps(saved))  # a deep copy
  surgery = saved.get("surgery", {})
  legacy = surgery.pop("max_rank", None)
  if legacy is not None:
    saved["model"]["max_rank"], saved["model"]["dense"] = legacy or 1, not legacy
  if isinstance(surgery.get("rules"), str):  # a preset name, before rules became a tuple
    surgery["rules"] = [surgery["rules"]]
  if saved.get("data", {}).get("eval_examples") is None and "data" in saved:
    saved["data"]["eval_examples"] = 0
  config = defaults()
  _merge(config, saved, "")
  return config


def _merge(config: ml_collections.ConfigDict, saved: dict, prefix: str) -> None:
  for key, value in saved.items():
    if key not in config:
      continue  # a field retired since: nothing reads it
    if f"{prefix}{key}" in FREE_FORM:  # lists back to the tuples a config file writes
      config[key] = ml_collections.ConfigDict(_tuples_in(value))
      continue
    if isinstance(config[key], ml_collections.ConfigDict):
      _merge(config[key], value, f"{prefix}{key}.")
      continue
    try:
      config[key] = _tuples_in(value)
    except TypeError:
      raise ConfigError(
        f"{prefix}{key}",
        str(value),
        f"a {type(config[key]).__name__}",
        "a saved config field this version cannot read",
      ) from None


def _tuples_in(value: Any) -> Any:
  """`value` (parsed JSON) with every list, at any depth, a tuple."""
  if isinstance(value, dict):
    return {k: _tuples_in(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples_in(v) for v in value)
  return value


def seq_len(config: ml_collections.ConfigDict) -> int | None:
  """Tokens per example of a text task (what a sequence model's FLOPs are counted over); None
  for an image task (one row per example)."""
  return None if config.task == "image_classification" else config.data.seq_len


def fixed_ranks(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The ranks a fixed rank set trains: `ranks.fixed`, or by default every rank up to 8, then
  powers of two up to R (held-out ranks below 8 do not interpolate from trained neighbours;
  docs/results.md)."""
  r = config.model.max_rank
  default = [*(2**i for i in range(r.bit_length()) if 8 < 2**i < r), *range(min(r, 8), 0, -1)]
  return tuple(config.ranks.fixed) or tuple(dict.fromkeys([r, *sorted(default, reverse=True)]))


def remat_policy(config: ml_collections.ConfigDict) -> str | None:
  """The checkpoint policy each model block trains under (`nsn_jax.remat`); None: no remat."""
  return None if config.train.remat == "none" else config.train.remat_policy


def multi_rank(config: ml_collections.ConfigDict) -> str:
  """How a multi-rank step runs its ranks: `train.multi_rank`, where auto is bucketed for a fixed
  set (as fast as vmap_masked or faster, docs/benchmarks.md) and vmap_masked for drawn ranks."""
  if config.train.multi_rank != "auto":
    return config.train.multi_rank
  return "bucketed" if config.ranks.kind == "fixed" else "vmap_masked"


def eval_ranks(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The ranks evaluated during training: `eval.ranks`, or by default R, R/4 and R/16 (so a
  config that only changes R stays valid)."""
  r = config.model.max_rank
  return tuple(config.eval.ranks) or tuple(dict.fromkeys(max(1, r // d) for d in (1, 4, 16)))


def validate(
  config: ml_collections.ConfigDict, num_devices: int | None = None, restoring: bool = False
) -> None:
  """Raises ConfigError for the first field outside what is valid.

  `num_devices`: the devices the mesh is laid over (checks the mesh and batch split); None
  skips those checks (eval, export). `restoring`: only what rebuilding the model reads (task,
  data, model, surgery), so a checkpoint stays readable when a training-only rule tightens or
  `model.init_from`'s run has moved.
  """
  _check_fields(config, defaults(), "")
  _check_top(config)
  _check_task(config)
  _check_data(config)
  _check_model(config, check_init_from=not restoring)
  if restoring:
    return
  _check_ranks(config)
  _check_objective(config)
  _check_train(config)
  if num_devices is not None:
    _check_mesh(config, num_devices)


def _check_fields(config, schema, prefix: str) -> None:
  """Unknown fields (a typo in a config file) and sections replaced by a non-section."""
  for key in config:
    if key not in schema:
      raise ConfigError(
        f"{prefix}{key}",
        config[key],
        f"the fields of {prefix or 'the config'}"
        f" in nsn_jax/config.py ({', '.join(sorted(schema.keys()))})",
        "unknown field",
      )
    if isinstance(schema[key], ml_collections.ConfigDict):
      if not isinstance(config[key], ml_collections.ConfigDict):
        raise ConfigError(f"{prefix}{key}", str(config[key]), "a section", "not a section")
      if f"{prefix}{key}" not in FREE_FORM:
        _check_fields(config[key], schema[key], f"{prefix}{key}.")


def _one_of(field: str, value: Any, choices: tuple) -> None:
  if value not in choices:
    raise ConfigError(field, value, " | ".join(map(str, choices)))


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _integer(field: str, value: Any, low: int, high: float = math.inf) -> None:
  if not _is_int(value) or not low <= value <= high:
    span = f"{low}..{high}" if high != math.inf else f"an integer ≥ {low}"
    raise ConfigError(field, value, span)


def _number(
  field: str, value: Any, low: float, high: float = math.inf, low_open: bool = False
) -> None:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if not ok or value > high or value < low or (low_open and value == low):
    if high == math.inf:
      raise ConfigError(field, value, f"a finite number {'>' if low_open else '≥'} {low:g}")
    left = "(" if low_open else "["
    raise ConfigError(field, value, f"a number in {left}{low:g}, {high:g}]")


def _check_top(config) -> None:
  _integer("seed", config.seed, 0, 2**31 - 1)  # JAX keys and numpy generators take it
  _one_of("task", config.task, TASKS)
  _one_of("model.name", config.model.name, MODELS)


def _check_task(config) -> None:
  """The task the model family can do."""
  name, task = config.model.name, config.task
  if name == "nsn_mlp" and task != "image_classification":
    raise ConfigError("task", task, "image_classification for model.name=nsn_mlp")
  if name == "bert_hf" and task != "text_classification":
    raise ConfigError("task", task, "text_classification for model.name=bert_hf")
  if name in DECODERS and task == "image_classification":
    raise ConfigError("task", task, f"text_classification | language_modelling for {name}")
  if name == "custom" and task != "image_classification":
    raise ConfigError(
      "task",
      task,
      "image_classification for model.name=custom",
      "text tasks need a tokenizer, which only the pretrained families bring",
    )


def _check_data(config) -> None:
  data = config.data
  for field, example in (("name", "mnist5k"), ("train_split", "train"), ("eval_split", "test")):
    if not isinstance(data[field], str) or not data[field]:
      raise ConfigError(f"data.{field}", data[field], f"a TFDS name, e.g. {example}")
  if data.name == "digits":
    _check_digits(config)
  _integer("data.eval_examples", data.eval_examples, 0)
  if config.task == "image_classification":
    if not data.image_shape or any(not _is_int(d) or d < 1 for d in data.image_shape):
      raise ConfigError("data.image_shape", data.image_shape, "positive sizes, e.g. (28, 28, 1)")
    if data.text_feature or data.seq_len is not None:  # they would switch the input to text
      raise ConfigError(
        "data.text_feature", data.text_feature, "() and data.seq_len None for image_classification"
      )
  else:
    if not data.text_feature:
      raise ConfigError("data.text_feature", data.text_feature, "one or more feature names")
    _integer("data.seq_len", data.seq_len, 2)
  if config.task == "language_modelling":
    if data.num_classes is not None:
      raise ConfigError(
        "data.num_classes",
        data.num_classes,
        "None for language_modelling",
        "a language model predicts tokens, not classes",
      )
  else:
    _integer("data.num_classes", data.num_classes, 2)


def _check_digits(config) -> None:
  """data.name=digits (nsn_jax/data/digits.py, not imported here): scikit-learn's 8×8 grey
  digits, 10 classes, splits train and test."""
  data = config.data
  for field, value, valid in (
    ("task", config.task, "image_classification"),
    ("data.image_shape", _tuples_in(data.image_shape), (8, 8, 1)),
    ("data.num_classes", data.num_classes, 10),
  ):
    if value != valid:
      raise ConfigError(field, value, f"{valid!r} with data.name='digits'")
  for field in ("train_split", "eval_split"):
    if data[field] not in ("train", "test"):
      raise ConfigError(f"data.{field}", data[field], "train | test with data.name='digits'")


def _check_model(config, check_init_from: bool = True) -> None:
  model = config.model
  _one_of("model.dtype", model.dtype, DTYPES)
  if not isinstance(model.dense, bool):
    raise ConfigError("model.dense", model.dense, "True | False")
  pretrained = model.name in PRETRAINED
  if model.name == "nsn_mlp":
    if not model.hidden or any(not _is_int(h) or h < 1 for h in model.hidden):
      raise ConfigError("model.hidden", model.hidden, "one or more positive widths")
    if model.path:
      raise ConfigError(
        "model.path", model.path, '"" for nsn_mlp', "only pretrained models read a file"
      )
    if model.init_from and model.dense:
      raise ConfigError(
        "model.init_from",
        model.init_from,
        '"" with model.dense=True',
        "a dense twin starts nested runs (model.dense=False), not another dense run",
      )
    width = min(math.prod(config.data.image_shape), *model.hidden)
    if not model.dense:
      _integer("model.max_rank", model.max_rank, 1, width)
  elif not model.dense:
    _integer("model.max_rank", model.max_rank, 1)
  if model.name == "hf_decoder" and not model.path:
    raise ConfigError(
      "model.path", model.path, "a Hugging Face decoder directory (config.json + safetensors)"
    )
  if model.name == "custom":
    if model.dtype != "float32":
      raise ConfigError(
        "model.dtype", model.dtype, '"float32" for custom', "the factory picks its dtypes"
      )
    if model.path:
      raise ConfigError(
        "model.path", model.path, '"" for custom', "model.kwargs carry what the factory reads"
      )
    model_factory(config)
  elif model.factory or model.kwargs:
    raise ConfigError(
      "model.factory", model.factory, '"" and no model.kwargs unless model.name=custom'
    )
  _check_surgery(config)  # also where no surgery runs: a set field is never silently ignored
  for field in ("path", "init_from") if check_init_from else ("path",):
    if (
      (pretrained or field == "init_from")
      and model[field]
      and not epath.Path(model[field]).exists()
    ):
      raise ConfigError(f"model.{field}", model[field], "an existing path", "not found")


def model_factory(config: ml_collections.ConfigDict):
  """The callable `model.factory` names ("package.module:callable"), imported from sys.path or
  the working directory; a ConfigError naming what is wrong otherwise."""
  spec = config.model.factory
  module, _, name = spec.partition(":") if isinstance(spec, str) else ("", "", "")
  valid = "'package.module:callable' building an nnx.Module, importable from sys.path or the cwd"
  if not module or not name:
    raise ConfigError("model.factory", spec, valid)
  if os.getcwd() not in sys.path:  # as `python -m` would: the user's own package is found
    sys.path.append(os.getcwd())
  try:
    factory = getattr(importlib.import_module(module), name)
  except Exception as e:  # the user's module: whatever importing it raises
    raise ConfigError("model.factory", spec, valid, f"{type(e).__name__}: {e}") from None
  if not callable(factory):
    raise ConfigError("model.factory", spec, valid, f"{name} is not callable")
  return factory


def _check_surgery(config) -> None:
  surgery = config.surgery
  if isinstance(surgery.rules, str) or not surgery.rules:
    raise ConfigError(
      "surgery.rules",
      surgery.rules,
      f"a tuple of presets ({' | '.join(SURGERY_PRESETS)}) and/or path regexes, e.g. ('mlp',)",
    )
  for rule in surgery.rules:
    _regex("surgery.rules", rule)
  _one_of("surgery.init", surgery.init, ("svd", "activation_aware"))
  _integer("surgery.calibration_batches", surgery.calibration_batches, 1)


def _regex(field: str, rule: Any) -> None:
  try:
    re.compile(rule)
  except (re.error, TypeError) as e:
    raise ConfigError(field, rule, "Python regular expressions", str(e)) from None


def _check_ranks(config) -> None:
  ranks, max_rank = config.ranks, config.model.max_rank
  _one_of("ranks.kind", ranks.kind, ("fixed", "anchor_variants"))
  _one_of("train.multi_rank", config.train.multi_rank, MULTI_RANK)
  _one_of("train.remat", config.train.remat, remat.MODES)
  _one_of("train.remat_policy", config.train.remat_policy, remat.POLICIES)
  if config.model.dense:  # the ranks section does not apply; what would be ignored is refused
    if config.eval.ranks:
      raise ConfigError(
        "eval.ranks",
        config.eval.ranks,
        "() with model.dense=True",
        "a dense model is evaluated as itself",
      )
    return
  valid = f"distinct integers in 1..{max_rank} (model.max_rank)"
  if ranks.kind == "fixed":
    _rank_list("ranks.fixed", fixed_ranks(config), max_rank, valid, empty_ok=False)
    if max_rank not in fixed_ranks(config):  # the anchor; evaluation and budgets start from R
      raise ConfigError(
        "ranks.fixed", ranks.fixed, f"a set including R={max_rank} (model.max_rank), the anchor"
      )
    if ranks.held_out:
      raise ConfigError(
        "ranks.held_out",
        ranks.held_out,
        "() with ranks.kind=fixed",
        "with fixed ranks every rank not in ranks.fixed is held out",
      )
  else:
    if max_rank < 2:
      raise ConfigError(
        "ranks.kind",
        ranks.kind,
        f"fixed with model.max_rank={max_rank}",
        "anchor_variants draws ranks below R",
      )
    _integer("ranks.min_rank", ranks.min_rank, 1, max_rank - 1)  # R is the anchor already
    _integer("ranks.num_variants", ranks.num_variants, 1)
    _one_of("ranks.curriculum", ranks.curriculum, ("linear", "step", "none"))
    _number("ranks.warmup_fraction", ranks.warmup_fraction, 0.0, 1.0)
    _integer("ranks.num_stages", ranks.num_stages, 1)
    _rank_list(
      "ranks.held_out",
      ranks.held_out,
      max_rank - 1,
      f"distinct integers in 1..{max_rank - 1} (R={max_rank} is the anchor)",
      empty_ok=True,
    )
    below = [r for r in ranks.held_out if r < ranks.min_rank]
    if below:
      raise ConfigError(
        "ranks.held_out",
        ranks.held_out,
        f"ranks in {ranks.min_rank}..{max_rank - 1}",
        f"{below} are below ranks.min_rank: never drawn anyway",
      )
    if set(range(ranks.min_rank, max_rank)) <= set(ranks.held_out):
      raise ConfigError("ranks.held_out", ranks.held_out, "leaving a rank below R to train")
  _rank_list("eval.ranks", config.eval.ranks, max_rank, valid, empty_ok=True)
  if config.train.multi_rank in ("loop_static", "bucketed") and ranks.kind != "fixed":
    raise ConfigError(
      "train.multi_rank",
      config.train.multi_rank,
      "auto | vmap_masked with ranks.kind=anchor_variants",
      "drawn ranks are data, not static slices",
    )


def _rank_list(field: str, ranks: Any, max_rank: int, valid: str, empty_ok: bool) -> None:
  if isinstance(ranks, (int, str)) or (not ranks and not empty_ok):
    raise ConfigError(field, ranks, f"a tuple of {valid}")
  bad = [
    r for r in ranks if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= max_rank
  ]
  if bad or len(set(ranks)) != len(ranks):
    raise ConfigError(field, ranks, valid, f"{bad} out of range" if bad else "repeated ranks")


def _check_objective(config) -> None:
  name = config.objective.name
  _one_of("objective.name", name, OBJECTIVES)
  _number("objective.logits_weight", config.objective.logits_weight, 0.0)
  _number("objective.ortho_weight", config.objective.ortho_weight, 0.0)
  _check_flexrank(config)
  if name == DISTILL:
    _check_distill(config)
  elif config.model.dense and name not in ("uncertainty", "uniform", "anchor_only"):
    raise ConfigError(
      "objective.name",
      name,
      "the default (ignored) in dense mode",
      "a dense model trains one plain loss",
    )


def _check_flexrank(config) -> None:
  flex, distill = config.flexrank, config.objective.name == DISTILL
  _one_of("flexrank.budget_unit", flex.budget_unit, ("flops", "params"))
  for budget in flex.budgets:
    _number("flexrank.budgets", budget, 0.0, 1.0, low_open=True)
  if len(set(flex.budgets)) != len(flex.budgets):
    raise ConfigError("flexrank.budgets", flex.budgets, "distinct fractions", "repeated budget")
  if flex.budgets and (config.model.name not in SURGERY or config.model.dense):
    raise ConfigError(
      "flexrank.budgets",
      flex.budgets,
      f"() unless a model gets surgery (model.name {' / '.join(SURGERY)}, model.dense=False)",
    )
  if flex.probabilities and not distill:
    raise ConfigError(
      "flexrank.probabilities",
      flex.probabilities,
      f"() unless objective.name={DISTILL}",
      "only distillation samples the profiles",
    )
  numbers = all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in flex.probabilities)
  if flex.probabilities and (
    not numbers
    or len(flex.probabilities) != len(flex.budgets)
    or min(flex.probabilities) < 0
    or not math.isclose(sum(flex.probabilities), 1.0)
  ):
    raise ConfigError(
      "flexrank.probabilities",
      flex.probabilities,
      f"{len(flex.budgets)} non-negative numbers summing to 1, or () = uniform",
    )


def _check_distill(config) -> None:
  """What FlexRank's distillation needs: budgets, no global eval ranks, a teacher."""
  if not config.flexrank.budgets:
    raise ConfigError(
      "flexrank.budgets",
      config.flexrank.budgets,
      f"one or more fractions in (0, 1] for objective.name={DISTILL}, e.g. (0.3, 0.5, 0.7, 0.9)",
    )
  if config.eval.ranks:
    raise ConfigError(
      "eval.ranks",
      config.eval.ranks,
      f"() with objective.name={DISTILL}",
      "distillation evaluates its profiles, not global ranks",
    )
  if config.task == "text_classification" and not config.model.init_from:
    raise ConfigError(
      "model.init_from",
      "",
      "the workdir of the dense twin fine-tuned on this task",
      "distilling a classifier needs a fine-tuned teacher",
    )


def _check_train(config) -> None:
  train, opt, ev = config.train, config.optimizer, config.eval
  _integer("train.steps", train.steps, 1)
  _integer("train.batch_size", train.batch_size, 1)
  for field in ("log_every", "checkpoint_every", "max_to_keep"):
    _integer(f"train.{field}", train[field], 1)
  _integer("train.loss_chunk", train.loss_chunk, 0)
  if isinstance(train.trainable, str) or not train.trainable:
    raise ConfigError("train.trainable", train.trainable, 'a tuple of path regexes; ("",) = all')
  for rule in train.trainable:
    _regex("train.trainable", rule)
  _number("optimizer.learning_rate", opt.learning_rate, 0.0, low_open=True)
  _number("optimizer.weight_decay", opt.weight_decay, 0.0)
  if not _is_int(opt.warmup_steps) or not 0 <= opt.warmup_steps < train.steps:
    raise ConfigError(
      "optimizer.warmup_steps",
      opt.warmup_steps,
      f"0..{train.steps - 1} (fewer than train.steps={train.steps})",
    )
  _integer("eval.every", ev.every, 1)
  _integer("eval.batch_size", ev.batch_size, 1)


def _check_mesh(config, num_devices: int) -> None:
  sizes = {axis: config.mesh[axis] for axis in MESH_AXES}
  for axis, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, int) or size == 0 or size < -1:
      raise ConfigError(f"mesh.{axis}", size, "a positive device count, or -1 for the rest")
  if list(sizes.values()).count(-1) > 1:
    raise ConfigError("mesh", str(sizes), "at most one axis of -1")
  known = math.prod(s for s in sizes.values() if s != -1)
  if num_devices % known:
    raise ConfigError(
      "mesh", str(sizes), f"axis sizes whose product divides the {num_devices} devices"
    )
  split = math.prod(num_devices // known if sizes[a] == -1 else sizes[a] for a in ("data", "fsdp"))
  if config.train.batch_size % split:
    raise ConfigError(
      "train.batch_size",
      config.train.batch_size,
      f"a multiple of the data × fsdp devices ({split})",
    )
  _check_sharding_rules(config.sharding.rules)
  _integer("sharding.min_size", config.sharding.min_size, 0)


def _check_sharding_rules(rules: Any) -> None:
  valid = (
    f"(path regex, (entry, ...)) pairs, an entry per dimension: None, an axis or a tuple of "
    f"axes from {MESH_AXES}, each axis at most once per rule"
  )
  for rule in rules:
    if not isinstance(rule, (tuple, list)) or len(rule) != 2:
      raise ConfigError("sharding.rules", str(rule), valid)
    _regex("sharding.rules", rule[0])
    spec = rule[1]
    if not isinstance(spec, (tuple, list)):
      raise ConfigError("sharding.rules", str(rule), valid)
    names = [a for entry in spec for a in (entry if isinstance(entry, (tuple, list)) else (entry,))]
    names = [a for a in names if a is not None]
    bad = [a for a in names if a not in MESH_AXES]
    if bad or len(set(names)) != len(names):
      problem = f"unknown axes {bad}" if bad else f"an axis used twice in {tuple(spec)}"
      raise ConfigError("sharding.rules", str(rule), valid, problem)
