"""Models built from a validated config (`nsn_jax.config`), and the tokenizer a text model brings.

  nsn_mlp      the paper's from-scratch MLP (`model.hidden`, `model.max_rank`)
  llama_gguf   a Llama-family decoder from a GGUF file (`model.path`; default SmolLM2-135M)
  hf_decoder   a Llama / Mistral / Qwen2 / Gemma decoder from a Hugging Face directory
  bert_hf      a BERT encoder from a Hugging Face directory (default all-MiniLM-L6-v2)
  custom       your own Flax NNX model: `model.factory(**model.kwargs, rngs=nnx.Rngs(seed))`

A pretrained backbone gets the task's head (`task`: text_classification adds
`SequenceClassifier`; language_modelling keeps the decoder's own head), then `surgery` turns the
layers its rules select into NSN layers of rank `model.max_rank` (`nsn_jax.surgery`); a custom
model gets the same surgery at its random init (its nnx.Linear layers' SVD). With `model.dense`
every model keeps plain dense layers: the baseline twin.
"""

from __future__ import annotations

from collections.abc import Callable
import json
import math
import pathlib
import re

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tokenizers

from nsn_jax import sharding, surgery
from nsn_jax.config import DECODERS, PRETRAINED, SURGERY, ConfigError, model_factory
from nsn_jax.data.pipeline import TextEncoder
from nsn_jax.llm import (
  GGUFTokenizer,
  HFTokenizer,
  config_from_gguf,
  config_from_hf,
  config_from_hf_decoder,
  gguf_metadata,
  load_gguf,
  load_hf_bert,
  load_hf_decoder,
  minilm_path,
  pretrained_kind,
  smollm2_path,
)
from nsn_jax.models.bert import BertModel
from nsn_jax.models.heads import SequenceClassifier
from nsn_jax.models.llama import LlamaModel
from nsn_jax.models.mlp import NSNMLP
from nsn_jax.sharding import Layout

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
  if config.model.name == "custom":
    pairs.append(("model.factory", config.model.factory, other.model.factory))
    plain = lambda kwargs: json.dumps(kwargs.to_dict(), sort_keys=True)  # tuples == lists
    pairs.append(("model.kwargs", plain(config.model.kwargs), plain(other.model.kwargs)))
  if config.model.name == "nsn_mlp":
    pairs.append(("model.hidden", tuple(config.model.hidden), tuple(other.model.hidden)))
    pairs.append(
      ("data.image_shape", tuple(config.data.image_shape), tuple(other.data.image_shape))
    )
  return [key for key, ours, theirs in pairs if ours != theirs]


def _backbone(
  config: ml_collections.ConfigDict, pretrained: bool, seed: int, layout: Layout | None = None
) -> nnx.Module:
  """The pretrained model (each parameter loaded straight into `layout`'s sharding; None: one
  device), or with `pretrained=False` the same architecture with random weights (read from the
  file's metadata only: what restoring a checkpoint needs). A custom model is always built at
  its random init."""
  if config.model.name == "custom":
    return model_factory(config)(**config.model.kwargs.to_dict(), rngs=nnx.Rngs(seed))
  path, dtype = model_path(config), _dtype(config)
  if pretrained:
    return _LOADERS[config.model.name](path, dtype, layout)[1]
  if config.model.name == "llama_gguf":
    return LlamaModel(config_from_gguf(gguf_metadata(path)), dtype=dtype, rngs=nnx.Rngs(seed))
  hf_config = json.loads((path / "config.json").read_text())
  if config.model.name == "hf_decoder":
    return LlamaModel(config_from_hf_decoder(hf_config), dtype=dtype, rngs=nnx.Rngs(seed))
  return BertModel(config_from_hf(hf_config), dtype=dtype, rngs=nnx.Rngs(seed))


_LOADERS = {"llama_gguf": load_gguf, "hf_decoder": load_hf_decoder, "bert_hf": load_hf_bert}
# What `pretrained_kind` must find at model.path for each family.
_KINDS = {"llama_gguf": "gguf", "hf_decoder": "hf_decoder", "bert_hf": "bert"}


def check_model_file(config: ml_collections.ConfigDict) -> None:
  """A ConfigError naming model.path unless it holds what the family reads (a GGUF file, a
  Hugging Face decoder or BERT directory)."""
  path = model_path(config)
  try:
    kind = pretrained_kind(path)
  except (OSError, ValueError) as e:
    raise ConfigError(
      "model.path", str(path), f"what model.name={config.model.name} reads", str(e)
    ) from None
  if kind != _KINDS[config.model.name]:
    raise ConfigError(
      "model.path",
      str(path),
      f"what model.name={config.model.name} reads",
      f"it holds a {kind} model; use model.name={dict(zip(_KINDS.values(), _KINDS))[kind]}",
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
  if config.model.name not in SURGERY:
    model = nnx.eval_shape(lambda: build_model(config, seed=0, pretrained=False))
    return _check_trainable(config, _param_paths(model))
  if config.model.name in PRETRAINED:
    check_model_file(config)
  if config.model.name == "custom":
    model = _built_custom(config)
    _check_custom_output(config, model)
  else:
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


def _built_custom(config: ml_collections.ConfigDict) -> nnx.Module:
  """The custom model as shapes; a ConfigError if its factory raises on model.kwargs."""
  try:
    return nnx.eval_shape(lambda: _task_model(config, pretrained=False, seed=0))
  except Exception as e:  # the user's code: whatever it raises on these arguments
    problem = f"model.factory(**model.kwargs) raised {type(e).__name__}: {str(e).splitlines()[0]}"
    raise ConfigError(
      "model.kwargs", str(config.model.kwargs.to_dict()), "the factory's arguments", problem
    ) from None


def _check_custom_output(config: ml_collections.ConfigDict, model: nnx.Module) -> None:
  """A custom model must map images (B, *data.image_shape) to logits (B, data.num_classes)."""
  graphdef, state = nnx.split(model)
  images = jax.ShapeDtypeStruct((2, *config.data.image_shape), jnp.float32)
  expected = f"a model mapping images (B, {', '.join(map(str, config.data.image_shape))}) "
  expected += f"to logits (B, {config.data.num_classes})"
  try:
    out = jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)(x), state, images)
  except Exception as e:  # the user's code: any error it raises on this input
    problem = f"on that input it raised {type(e).__name__}: {str(e).splitlines()[0]}"
    raise ConfigError("model.factory", config.model.factory, expected, problem) from None
  if getattr(out, "shape", None) != (2, config.data.num_classes):
    shown = getattr(out, "shape", type(out).__name__)
    raise ConfigError("model.factory", config.model.factory, expected, f"it returned {shown}")


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
  mesh: jax.sharding.Mesh | None = None,
) -> tuple[nnx.Module, nnx.Module, dict[str, np.ndarray] | None]:
  """(dense, model, calibration) for a pretrained family: the pretrained backbone with the task's
  head before surgery (FlexRank's distillation teacher), the same after `config.surgery` (the
  dense model itself with `model.dense`), and the inputs {path: float32 (n, d_in)} the
  surgery's layers received while `calibrate(dense)` ran (None without `calibrate`).

  `dense`: start from this dense model instead (a fine-tuned twin, `model.init_from`).
  Activation-aware surgery (`surgery.init=activation_aware`) needs `calibrate`; plain SVD
  ignores the calibration inputs, which FlexRank's profile search still reads.
  `mesh`: the weights load, and the surgery's factors land, straight into the layout the train
  state gives them (`config.sharding`), so no device ever holds the whole model.
  """
  layout = None if mesh is None else sharding.config_layout(mesh, config.sharding, "model/")
  if dense is None:
    dense = _task_model(config, pretrained=True, seed=seed, layout=layout)
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
    layout=layout,
  )[0]
  return dense, model, calibration


def _task_model(
  config: ml_collections.ConfigDict, *, pretrained: bool, seed: int, layout: Layout | None = None
) -> nnx.Module:
  """The backbone (pretrained or random) with the head `config.task` needs, before surgery;
  `layout` as `build_pretrained` derives it, for the leaves' paths in the task model."""
  if config.task == "text_classification":
    inner = None if layout is None else lambda path, shape: layout(f"backbone/{path}", shape)
    model = _backbone(config, pretrained, seed, inner)
    return SequenceClassifier(model, config.data.num_classes, rngs=nnx.Rngs(params=seed))
  return _backbone(config, pretrained, seed, layout)  # language_modelling: its own head


def tokenizer(config: ml_collections.ConfigDict) -> GGUFTokenizer | HFTokenizer:
  """The tokenizer a pretrained decoder brings (encode, decode, eos_id, chat)."""
  if config.model.name == "llama_gguf":
    return GGUFTokenizer.from_metadata(gguf_metadata(model_path(config)))
  if config.model.name == "hf_decoder" and (model_path(config) / "tokenizer.json").is_file():
    return HFTokenizer.from_directory(model_path(config))
  raise ValueError(f"model.name={config.model.name} at {model_path(config)} brings no tokenizer.")


def text_encoder(config: ml_collections.ConfigDict) -> TextEncoder | None:
  """The tokenizer of a pretrained text model as a TextEncoder; None for image models."""
  if config.model.name in DECODERS:
    decoder = tokenizer(config)
    return TextEncoder(decoder.encode, decoder.eos_id or 0)
  if config.model.name == "bert_hf":
    bert = tokenizers.Tokenizer.from_file(str(model_path(config) / "tokenizer.json"))
    bert.no_padding()  # the pipeline pads and truncates to data.seq_len itself
    bert.no_truncation()
    pad = bert.token_to_id("[PAD]")
    return TextEncoder(lambda text: bert.encode(text).ids, 0 if pad is None else pad)
  return None
