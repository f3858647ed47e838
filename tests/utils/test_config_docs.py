"""--show_config's listing: field docs from the comments of the experiment modules."""
from __future__ import annotations

import textwrap

import pytest

import experiments
from tests.conftest import ROOT
from wh_errmap.utils.config_docs import (ModuleDocs, describe_config, experiment_modules,
                                         field_doc, leaves, module_docs)

SOURCE = textwrap.dedent('''\
    """A module docstring # not a comment."""
    import ml_collections


    def get_config():
      c = ml_collections.ConfigDict()
      c.plain = 1            # trailing comment
      c.continued = 2        # first part,
                             # second part
      c.realigned = "auto"   # dtype: "auto" = bfloat16 on GPU,
      #                        float32 on CPU
      # the comment above, over
      # two lines
      c.above = 3
      c.bare = 4

      c.after_bare = 5       # its own
      c.group = ml_collections.ConfigDict(   # the group's comment
          {"first": 1,
           "second": 2,      # second's own
           "third": 3})
      c.called = ml_collections.ConfigDict(dict(x=1, y=2))  # made by dict()
      c.empty = ml_collections.ConfigDict()   # an empty group: nothing to pass on
      c.empty.inner = 6
      return c


    def shrink(c):
      c.plain = 0            # a second assignment: the first doc stays


    def run(config, workdir):
      other = ml_collections.ConfigDict(config.to_dict())
      other.bare = 7         # run-time copies are not documentation
    ''')


def test_each_kind_of_comment_gives_its_field_a_doc():
  docs = module_docs(SOURCE)
  assert docs.fields["plain"] == "trailing comment"
  assert docs.fields["continued"] == "first part, second part"
  assert docs.fields["realigned"] == 'dtype: "auto" = bfloat16 on GPU, float32 on CPU'
  # The continuation above is realigned's, not the start of above's comment.
  assert docs.fields["above"] == "the comment above, over two lines"
  assert "bare" not in docs.fields   # no comment; run()'s assignment does not count
  assert docs.fields["after_bare"] == "its own"
  assert docs.fields["group.second"] == "second's own"
  assert docs.groups["group"] == "the group's comment"
  assert docs.groups["called"] == "made by dict()"
  assert "empty" not in docs.groups and "empty.inner" not in docs.fields


def test_keys_of_a_group_take_its_comment_and_a_later_module_wins():
  docs = module_docs(SOURCE)
  assert field_doc("group.first", [docs]) == "the group's comment"
  assert field_doc("group.second", [docs]) == "second's own"
  assert field_doc("called.y", [docs]) == "made by dict()"
  assert field_doc("empty.inner", [docs]) == ""
  later = ModuleDocs(fields={"plain": "the variant's", "group.first": "first, redone"})
  assert field_doc("plain", [docs, later]) == "the variant's"
  assert field_doc("group.first", [docs, later]) == "first, redone"
  assert field_doc("plain", [later, docs]) == "trailing comment"


def test_the_modules_of_an_experiment_come_dependencies_first():
  names = [m.__name__.rpartition(".")[2]
           for m in experiment_modules(experiments.load("quickstart"))]
  assert names == ["base", "cv_fold", "cv_fold_small", "quickstart"]


@pytest.mark.parametrize("name", experiments.names())
def test_every_experiment_shows_each_leaf_once_as_a_literal(name):
  experiment = experiments.load(name)
  config = experiment.get_config()
  lines = describe_config(config, experiment).splitlines()
  fields = list(leaves(config))
  assert len(lines) == len(fields)
  for line, (key, value) in zip(lines, fields):
    shown, _, doc = line.partition("  # ")
    assert shown == f"{key} = {value!r}"
    assert doc == doc.strip() and "\n" not in doc
  assert sum("  # " in line for line in lines) > len(lines) // 2, "most fields have docs"


def _source_comment_words(path, assignment: str) -> set[str]:
  """Words of the comment on the line that starts with `assignment`, or of the comment
  line right above it, read straight from the source file."""
  lines = path.read_text().splitlines()
  index = next(i for i, line in enumerate(lines) if line.strip().startswith(assignment))
  comment = lines[index].partition("#")[2] or lines[index - 1].strip().lstrip("#")
  return {word.strip(".,;:()") for word in comment.split() if len(word.strip(".,;:()")) > 3}


@pytest.mark.parametrize("name, key, path, assignment", [
    ("cv_fold", "train.seg3d.steps", "experiments/base.py", "\"steps\": 20000,"),
    ("predict", "qc.batch", "experiments/predict.py", "c.qc.batch ="),
    ("predict", "threshold", "experiments/predict.py", "c.threshold ="),
])
def test_a_documented_field_shows_words_of_its_source_comment(name, key, path, assignment):
  words = _source_comment_words(ROOT / path, assignment)
  assert words
  experiment = experiments.load(name)
  line = next(line for line in describe_config(experiment.get_config(), experiment).splitlines()
              if line.startswith(f"{key} = "))
  doc = line.partition("  # ")[2]
  assert doc and any(word in doc for word in words), (line, words)
