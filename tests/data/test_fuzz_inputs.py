"""Inputs as a careless or hostile user gives them: every bad file is one AtlasError naming it.

Property tests in the manner of parser fuzzing: a valid data file or config file is corrupted
(random bytes written over it, lines cut, a wrong encoding, fields added or removed) and reading
it must either succeed with sane values or raise ``AtlasError`` whose one-line message names the
file, never another exception.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlasfl.config import from_dict, from_yaml
from atlasfl.data.glue import read_examples
from atlasfl.data.tasks import GLUE_TASKS
from atlasfl.errors import AtlasError

SST2 = "sentence\tlabel\nit is good .\t1\nbad film\t0\na fine , quiet movie\t1\n"
STSB = ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tmain\tf\t2012\t1\tx\ty\ta plane takes off .\tan air plane is taking off .\t5.000\n"
        "1\tmain\tf\t2012\t4\tx\ty\ta man plays .\ta man is playing .\t3.800\n")
CONFIG = ("method: fedavg\nseed: 0\ndata:\n  tasks: [sst2, mrpc]\n  samples: 24\n"
          "train:\n  lr: 0.01\n")
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture])


@st.composite
def corruptions(draw, text: str) -> bytes:
    data = bytearray(text.encode())
    kind = draw(st.sampled_from(["bytes", "cut", "encoding", "fields", "lines"]))
    if kind == "bytes":  # random bytes written over random places
        for _ in range(draw(st.integers(1, 6))):
            at = draw(st.integers(0, len(data) - 1))
            data[at:at + 1] = draw(st.binary(min_size=1, max_size=4))
    elif kind == "cut":  # the file ends mid-line
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "encoding":  # saved by an editor in another encoding
        encoding = draw(st.sampled_from(["utf-16", "latin-1", "cp1252"]))
        data = bytearray(text.replace("good", "gööd").replace("fedavg", "fédavg")
                         .encode(encoding))
    elif kind == "fields":  # a field added to or removed from one line
        lines = text.split("\n")
        i = draw(st.integers(0, len(lines) - 2))
        parts = lines[i].split("\t")
        if draw(st.booleans()):
            parts.append(draw(st.text(max_size=5)))
        elif len(parts) > 1:
            parts.pop(draw(st.integers(0, len(parts) - 1)))
        lines[i] = "\t".join(parts)
        data = bytearray("\n".join(lines).encode("utf-8", "surrogatepass"))
    else:  # lines duplicated, dropped or swapped with random text
        lines = text.split("\n")
        i = draw(st.integers(0, len(lines) - 1))
        lines[i] = draw(st.text(max_size=40))
        data = bytearray("\n".join(lines).encode("utf-8", "surrogatepass"))
    return bytes(data)


def _read_or_refuse(path, spec):
    try:
        examples = read_examples(path, spec)
    except AtlasError as exc:
        message = str(exc)
        assert str(path) in message and "\n" not in message
        return
    assert len(examples) > 0 and len(examples.texts) == len(examples.labels)
    assert np.isfinite(examples.labels.astype(float)).all()
    if not spec.is_regression:
        assert set(examples.labels.tolist()) <= set(range(spec.num_labels))


@FUZZ
@given(case=st.sampled_from([("sst2", SST2), ("stsb", STSB)]).flatmap(
    lambda task: corruptions(task[1]).map(lambda data: (task[0], data))))
def test_a_corrupted_data_file_is_read_or_refused_naming_it(tmp_path, case):
    task, data = case  # classification and regression files
    path = tmp_path / "train.tsv"
    path.write_bytes(data)
    _read_or_refuse(path, GLUE_TASKS[task])


@pytest.mark.parametrize("label", ["nan", "inf", "-inf"])
def test_a_non_finite_regression_label_is_refused(tmp_path, label):
    path = tmp_path / "train.tsv"
    path.write_text(STSB.replace("3.800", label))
    with pytest.raises(AtlasError, match=f"{path} line 3: label '{label}' is not a finite"):
        read_examples(path, GLUE_TASKS["stsb"])


@FUZZ
@given(data=corruptions(CONFIG))
def test_a_corrupted_config_is_loaded_or_refused_in_one_line(tmp_path, data):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(data)
    try:
        from_dict(from_yaml(path))
    except AtlasError as exc:
        assert "\n" not in str(exc)


@pytest.mark.parametrize("value", ["abc", [1, 2], {"a": 1}, True, None, math.inf])
def test_a_config_value_of_the_wrong_type_names_the_key(value):
    raw = yaml.safe_load(CONFIG)
    raw["train"]["lr"] = value
    if value is True:  # YAML's true is not a learning rate
        raw["train"]["lr"] = "true"
    with pytest.raises(AtlasError, match="train.lr"):
        from_dict(raw)
