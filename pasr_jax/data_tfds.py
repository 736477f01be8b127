"""A TFDS builder for question/answer JSON (alpaca_evol_instruct's instruction/output, our seed sets).

  python -m pasr_jax.data_tfds --config.data.files=a.jsonl --config.data.tfds_name=json_qa/NAME \\
      --config.data.tfds_data_dir=DIR [--config.data.question_field=F --config.data.answer_field=G]
  python -m pasr_jax.train ... --config.data.tfds_name=json_qa/NAME --config.data.tfds_data_dir=DIR

The keys are the training's `data` section (`PrepareCfg`): the command prepares its files as
the dataset the training then reads. Several files: `--config.data.files="('a.json','b.jsonl')"`.
Prepares `json_qa/NAME` (one BuilderConfig per NAME) in the array_record format, which
`tfds.data_source` reads with random access and without TensorFlow (data.load_tfds): the
training cursor (an index into a seeded permutation) stays exact across resumes. Rows are the
files' rows, validated by data.load_rows (field auto-detection and errors as for data.files);
each keeps its id. TFDS shuffles records on write, deterministically.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

PROG = "python -m pasr_jax.data_tfds"
PREFIX = "json_qa/"

if __name__ == "__main__":
  # TFDS finds a builder's resources through its module, which must not be __main__; run the
  # command from the imported module instead (and never define the builder class twice).
  try:
    from pasr_jax.data_tfds import main as _main  # pylint: disable=import-self
  except ModuleNotFoundError as e:
    if e.name != "tensorflow_datasets":
      raise
    print(f"{PROG}: the optional package tensorflow-datasets is not installed (it is in "
          "requirements.txt)", file=sys.stderr)
    sys.exit(2)
  _main()

# pylint: disable=wrong-import-position  # after the command's guard above
import tensorflow_datasets as tfds

from pasr_jax import cli
from pasr_jax import data as data_lib
from pasr_jax.config import DataCfg, Section, section
# pylint: enable=wrong-import-position


class JsonQa(tfds.core.GeneratorBasedBuilder):
  """`json_qa/<name>`: text features id, question, answer from JSON / JSONL files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "question / answer / id from JSON or JSONL files"}

  def __init__(self, *, name: str = "default", files: Sequence[str] = (),
               question_field: str = "", answer_field: str = "", **kwargs):
    self._files = tuple(files)
    self._fields = (question_field, answer_field)
    super().__init__(config=tfds.core.BuilderConfig(name=name), **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({"id": text, "question": text, "answer": text}))

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for path in self._files:
      for row in data_lib.load_rows(path, *self._fields):
        yield row.id, {"id": row.id, "question": row.question, "answer": row.answer}


def prepare(name: str, files: Sequence[str], data_dir: str, question_field: str = "",
            answer_field: str = "") -> str:
  """Builds json_qa/<name> in `data_dir` (array_record); returns the data.tfds_name to use.

  Files are validated first, so a bad row fails here with data.DataError, not inside TFDS.
  """
  if not files:
    raise data_lib.DataError("config data.files=(): no files to prepare")
  for path in files:
    data_lib.load_rows(path, question_field, answer_field)
  builder = JsonQa(name=name, files=files, question_field=question_field,
                   answer_field=answer_field, data_dir=data_dir)
  builder.download_and_prepare(file_format="array_record")
  return f"json_qa/{name}"


@dataclasses.dataclass(frozen=True)
class PrepareCfg(Section):
  """The keys of `python -m pasr_jax.data_tfds`: the training's data section."""
  data: DataCfg = section(DataCfg, "files (and their fields) prepared as tfds_name in "
                          "tfds_data_dir")

  def check(self) -> None:
    d = self.data
    d.need(bool(d.files), "files", "must name the JSON / JSONL files to prepare")
    name = d.tfds_name[len(PREFIX):]
    d.need(d.tfds_name.startswith(PREFIX) and bool(name) and "/" not in name, "tfds_name",
           f"must be {PREFIX}NAME: the dataset this command prepares")
    d.need(bool(d.tfds_data_dir), "tfds_data_dir", "must be set: the TFDS data dir to write")


def run(cfg: PrepareCfg) -> None:
  """Prepares cfg.data's files as its tfds_name and says how to train on it."""
  d = cfg.data
  name = prepare(d.tfds_name[len(PREFIX):], d.files, d.tfds_data_dir, d.question_field,
                 d.answer_field)
  print(f"prepared {name} in {d.tfds_data_dir}: train with --config.data.tfds_name={name} "
        f"--config.data.tfds_data_dir={d.tfds_data_dir}")


def main() -> None:
  """The command (module doc); exits."""
  cli.main(PROG, run, schema=PrepareCfg, preset=False, tune_malloc=False)
