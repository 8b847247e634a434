"""Models built from a validated config (`nsn_jax.config`), and the tokenizer a text model brings.

  nsn_mlp      the paper's from-scratch MLP (`model.hidden`, `model.max_rank`)
  llama_gguf   a Llama-family decoder from a GGUF file (`model.path`; default SmolLM2-135M)
  bert_hf      a BERT encoder from a Hugging Face directory (default all-MiniLM-L6-v2)

A pretrained backbone gets the task's head (`task`: text_classification adds
`SequenceClassifier`; language_modelling keeps the decoder's own head), then `surgery` turns the
layers its rules select into NSN layers of rank `model.max_rank` (`nsn_jax.surgery`). With
`model.dense` every model keeps plain dense layers: the baseline twin.
"""

from __future__ import annotations

from collections.abc import Callable
import json
import math
import pathlib
import re

from flax import nnx
import jax.numpy as jnp
import ml_collections
import numpy as np
import tokenizers

from nsn_jax import surgery
from nsn_jax.config import PRETRAINED, ConfigError
from nsn_jax.data.pipeline import TextEncoder
from nsn_jax.llm import (
  GGUFTokenizer,
  config_from_gguf,
  config_from_hf,
  gguf_metadata,
  load_gguf,
  load_hf_bert,
  minilm_path,
  smollm2_path,
)
from nsn_jax.models.bert import BertModel
from nsn_jax.models.heads import SequenceClassifier
from nsn_jax.models.llama import LlamaModel
from nsn_jax.models.mlp import NSNMLP

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
RULES = {
  "mlp": surgery.MLP_RULES,
  "attention": surgery.ATTENTION_RULES,
  "mlp_and_attention": surgery.MLP_RULES + surgery.ATTENTION_RULES,
}


def model_path(config: ml_collections.ConfigDict) -> pathlib.Path:
  """The pretrained file `config.model.path` names, or the offline SmolLM2 / MiniLM."""
  default = smollm2_path if config.model.name == "llama_gguf" else minilm_path
  return pathlib.Path(config.model.path or default())


def mismatches(config: ml_collections.ConfigDict, other: ml_collections.ConfigDict) -> list[str]:
  """What differs between two runs' configs that must agree for one run's model to start or
  stand beside the other's: the model family and file, the task, the dataset and its classes."""
  pairs = [
    ("model.name", config.model.name, other.model.name),
    ("task", config.task, other.task),
    ("data.name", config.data.name, other.data.name),
    ("data.num_classes", config.data.num_classes, other.data.num_classes),
  ]
  if config.model.name in PRETRAINED and other.model.name == config.model.name:
    pairs.insert(1, ("model file", model_path(config), model_path(other)))
  if config.model.name == "nsn_mlp":
    pairs.append(("model.hidden", tuple(config.model.hidden), tuple(other.model.hidden)))
    pairs.append(
      ("data.image_shape", tuple(config.data.image_shape), tuple(other.data.image_shape))
    )
  return [key for key, ours, theirs in pairs if ours != theirs]


def _backbone(config: ml_collections.ConfigDict, pretrained: bool, seed: int) -> nnx.Module:
  """The pretrained model, or with `pretrained=False` the same architecture with random weights
  (read from the file's metadata only: what restoring a checkpoint needs)."""
  path, dtype = model_path(config), _dtype(config)
  if config.model.name == "llama_gguf":
    if pretrained:
      return load_gguf(path, dtype)[1]
    return LlamaModel(config_from_gguf(gguf_metadata(path)), dtype=dtype, rngs=nnx.Rngs(seed))
  if pretrained:
    return load_hf_bert(path, dtype)[1]
  return BertModel(
    config_from_hf(json.loads((path / "config.json").read_text())), dtype=dtype, rngs=nnx.Rngs(seed)
  )


def _dtype(config: ml_collections.ConfigDict):
  """`config.model.dtype` (the computation dtype; parameters stay float32)."""
  return _DTYPES[config.model.dtype]


def surgery_rules(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """`config.surgery.rules` with each preset (mlp, attention, mlp_and_attention) expanded into
  its path regexes; any other entry is a regex itself."""
  return tuple(regex for rule in config.surgery.rules for regex in RULES.get(rule, (rule,)))


def build_model(
  config: ml_collections.ConfigDict,
  *,
  seed: int,
  pretrained: bool = True,
  calibrate: Callable[[nnx.Module], None] | None = None,
) -> nnx.Module:
  """The model that `config.model` (and for pretrained backbones `config.task`,
  `config.surgery`) describes, initialised from `seed`.

  pretrained=False builds a pretrained family's architecture with random weights and zero NSN
  factors (`surgery.nsn_skeleton`): the same structure, for restoring a checkpoint into.
  `calibrate(model)` runs the dense model on calibration data when `surgery.init` is
  activation_aware.
  """
  if config.model.name == "nsn_mlp":
    return NSNMLP(
      math.prod(config.data.image_shape),
      tuple(config.model.hidden),
      config.data.num_classes,
      None if config.model.dense else config.model.max_rank,
      dtype=_dtype(config),
      rngs=nnx.Rngs(params=seed),
    )
  if pretrained:
    return build_pretrained(config, seed=seed, calibrate=calibrate)[1]
  model = _task_model(config, pretrained=False, seed=seed)
  if config.model.dense:
    return model
  return surgery.nsn_skeleton(model, surgery_rules(config), config.model.max_rank)


def check_model_fits(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for what only the model's shapes tell, read without weights or data
  (a pretrained architecture from its file's metadata, built abstractly): `surgery.rules`
  matching no layer, `model.max_rank` above min(d_in, d_out) of a chosen layer (a global rank
  above it could not run), `data.seq_len` above a BERT's positions, `train.trainable` matching
  no parameter."""
  if config.model.name not in PRETRAINED:
    model = nnx.eval_shape(lambda: build_model(config, seed=0, pretrained=False))
    return _check_trainable(config, _param_paths(model))
  model = nnx.eval_shape(lambda: _task_model(config, pretrained=False, seed=0))
  positions = getattr(
    getattr(getattr(model, "backbone", None), "config", None), "max_positions", None
  )
  if positions is not None and config.data.seq_len > positions:
    raise ConfigError(
      "data.seq_len", config.data.seq_len, f"2..{positions} (the model's positions)"
    )
  paths = _param_paths(model)
  if not config.model.dense:
    chosen = _chosen_layers(config, model)
    _check_rank_fits(config, chosen)
    replaced = {f"{path}/kernel" for path, _, _ in chosen}  # becomes the factors a and b
    paths = [p for p in paths if p not in replaced]
    paths += [f"{path}/{factor}" for path, _, _ in chosen for factor in ("a", "b")]
  _check_trainable(config, paths)


def _param_paths(model: nnx.Module) -> list[str]:
  return ["/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def _check_trainable(config: ml_collections.ConfigDict, paths: list[str]) -> None:
  """Each regex of `train.trainable` must select some parameter (a typo would freeze it)."""
  for rule in config.train.trainable:
    if not any(re.search(rule, path) for path in paths):
      raise ConfigError(
        "train.trainable",
        config.train.trainable,
        f"regexes matching parameter paths such as {', '.join(paths[:3])}",
        f"{rule!r} matches no parameter",
      )


def _chosen_layers(config: ml_collections.ConfigDict, model: nnx.Module) -> list:
  """`surgery.chosen_linears` of the rules; a ConfigError naming the first entry of
  `surgery.rules` (a preset or a regex) that matches no layer, and a few layers there are."""
  linears = [path for path, _, _ in surgery.chosen_linears(model, ("",))]
  for entry in config.surgery.rules:
    if not any(re.search(rule, path) for rule in RULES.get(entry, (entry,)) for path in linears):
      raise ConfigError(
        "surgery.rules",
        config.surgery.rules,
        f"presets ({', '.join(RULES)}) or regexes matching layer paths such as "
        f"{', '.join(linears[:4])}",
        f"{entry!r} matches no dense layer",
      )
  return surgery.chosen_linears(model, surgery_rules(config))


def _check_rank_fits(config: ml_collections.ConfigDict, chosen: list) -> None:
  widths = {path: min(layer.in_features, layer.out_features) for path, _, layer in chosen}
  narrowest = min(widths, key=widths.get)
  if config.model.max_rank > widths[narrowest]:
    raise ConfigError(
      "model.max_rank",
      config.model.max_rank,
      f"1..{widths[narrowest]} "
      f"(min(d_in, d_out) of {narrowest}, the narrowest layer surgery.rules "
      "chooses)",
    )


def nsn_from_dense(config: ml_collections.ConfigDict, dense: nnx.Module) -> nnx.Module:
  """The nested model of `config` made from a trained dense twin: the layers its surgery picks
  (the MLP's hidden layers; `surgery.rules` for a pretrained family) replaced by their SVD at
  R = model.max_rank, the rest kept. At rank r each is the dense layer truncated to rank r: the
  dense + SVD baseline, and the start of `model.init_from` runs."""
  rules = (r"^hidden/",) if config.model.name == "nsn_mlp" else surgery_rules(config)
  return surgery.decompose_and_replace(dense, rules, config.model.max_rank)[0]


def build_pretrained(
  config: ml_collections.ConfigDict,
  *,
  seed: int,
  calibrate: Callable[[nnx.Module], None] | None = None,
  dense: nnx.Module | None = None,
) -> tuple[nnx.Module, nnx.Module, dict[str, np.ndarray] | None]:
  """(dense, model, calibration) for a pretrained family: the pretrained backbone with the task's
  head before surgery (FlexRank's distillation teacher), the same after `config.surgery` (the
  dense model itself with `model.dense`), and the inputs {path: float32 (n, d_in)} the
  surgery's layers received while `calibrate(dense)` ran (None without `calibrate`).

  `dense`: start from this dense model instead (a fine-tuned twin, `model.init_from`).
  Activation-aware surgery (`surgery.init=activation_aware`) needs `calibrate`; plain SVD
  ignores the calibration inputs, which FlexRank's profile search still reads.
  """
  if dense is None:
    dense = _task_model(config, pretrained=True, seed=seed)
  if config.model.dense:
    return dense, dense, None
  rules, init = surgery_rules(config), config.surgery.init
  if init == "activation_aware" and calibrate is None:
    raise ValueError("surgery.init=activation_aware needs calibration data.")
  calibration = None if calibrate is None else surgery.capture_inputs(dense, calibrate, rules)
  model = surgery.decompose_and_replace(
    dense,
    rules,
    config.model.max_rank,
    calibration=calibration if init == "activation_aware" else None,
  )[0]
  return dense, model, calibration


def _task_model(config: ml_collections.ConfigDict, *, pretrained: bool, seed: int) -> nnx.Module:
  """The backbone (pretrained or random) with the head `config.task` needs, before surgery."""
  model = _backbone(config, pretrained, seed)
  if config.task == "text_classification":
    return SequenceClassifier(model, config.data.num_classes, rngs=nnx.Rngs(params=seed))
  return model  # language_modelling: the decoder's own head


def text_encoder(config: ml_collections.ConfigDict) -> TextEncoder | None:
  """The tokenizer of a pretrained text model as a TextEncoder; None for image models."""
  if config.model.name == "llama_gguf":
    tokenizer = GGUFTokenizer.from_metadata(gguf_metadata(model_path(config)))
    return TextEncoder(tokenizer.encode, tokenizer.eos_id or 0)
  if config.model.name == "bert_hf":
    tokenizer = tokenizers.Tokenizer.from_file(str(model_path(config) / "tokenizer.json"))
    tokenizer.no_padding()  # the pipeline pads and truncates to data.seq_len itself
    tokenizer.no_truncation()
    pad = tokenizer.token_to_id("[PAD]")
    return TextEncoder(lambda text: tokenizer.encode(text).ids, 0 if pad is None else pad)
  return None
