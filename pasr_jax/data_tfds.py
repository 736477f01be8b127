"""A TFDS builder for question/answer JSON (alpaca_evol_instruct's instruction/output, our seed sets).

  python -m pasr_jax.data_tfds --name=NAME --files=a.json,b.jsonl --data_dir=DIR
  python -m pasr_jax.train ... --config.data.tfds_name=json_qa/NAME --config.data.tfds_data_dir=DIR

Prepares `json_qa/NAME` (one BuilderConfig per NAME) in the array_record format, which
`tfds.data_source` reads with random access and without TensorFlow (data.load_tfds): the
training cursor (an index into a seeded permutation) stays exact across resumes. Rows are the
files' rows, validated by data.load_rows (field auto-detection and errors as for data.files);
each keeps its id. TFDS shuffles records on write, deterministically.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import tensorflow_datasets as tfds

from pasr_jax import data as data_lib

if __name__ == "__main__":
  # TFDS finds a builder's resources through its module, which must not be __main__; run the
  # CLI from the imported module instead (and never define the builder class twice).
  from pasr_jax.data_tfds import main as _main  # pylint: disable=import-self
  raise SystemExit(_main())


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
    raise data_lib.DataError("data_tfds.prepare: no --files given")
  for path in files:
    data_lib.load_rows(path, question_field, answer_field)
  builder = JsonQa(name=name, files=files, question_field=question_field,
                   answer_field=answer_field, data_dir=data_dir)
  builder.download_and_prepare(file_format="array_record")
  return f"json_qa/{name}"


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m pasr_jax.data_tfds", allow_abbrev=False,
                               description=__doc__.split("\n")[0])
  ap.add_argument("--name", required=True, help="config name: the dataset is json_qa/NAME")
  ap.add_argument("--files", required=True, help="comma-separated JSON / JSONL files")
  ap.add_argument("--data_dir", required=True, help="TFDS data dir to write")
  ap.add_argument("--question_field", default="")
  ap.add_argument("--answer_field", default="")
  a = ap.parse_args(argv)
  try:
    tfds_name = prepare(a.name, [f for f in a.files.split(",") if f], a.data_dir,
                        a.question_field, a.answer_field)
  except data_lib.DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"prepared {tfds_name} in {a.data_dir}: train with --config.data.tfds_name={tfds_name} "
        f"--config.data.tfds_data_dir={a.data_dir}")
  return 0

