import numpy as np
import pytest

from atlasfl.config import CustomTaskConfig
from atlasfl.data.glue import load_task, read_examples
from atlasfl.data.partition import drop_test_overlap
from atlasfl.data.tasks import GLUE_TASKS, custom_task_spec, resolve_tasks
from atlasfl.errors import AtlasError

# Row counts from ../shared/data/glue/README.md
ROWS = {"sst2": (67349, 872), "cola": (8551, 1043), "mrpc": (3668, 408),
        "qnli": (9999, 5463), "rte": (2490, 277), "stsb": (5749, 1500)}


@pytest.mark.parametrize("task", sorted(ROWS))
def test_reader_parses_every_shared_file_with_its_row_count(glue_root, task):
    spec = GLUE_TASKS[task]
    train, test = load_task(spec, glue_root)
    assert (len(train), len(test)) == ROWS[task]
    assert all(len(row) == len(spec.text_fields) for row in train.texts)
    if spec.is_regression:
        assert train.labels.dtype == np.float32
        assert 0 <= train.labels.min() <= train.labels.max() <= 5
    else:
        assert set(np.unique(train.labels)) == set(range(spec.num_labels))


def test_quirks_bom_headerless_and_literal_quotes(glue_root):
    mrpc, _ = load_task(GLUE_TASKS["mrpc"], glue_root)  # BOM before the header "Quality"
    assert mrpc.texts[0][0].startswith("Amrozi accused his brother")
    assert '"the witness"' in mrpc.texts[0][0]  # quotes kept literally
    cola, _ = load_task(GLUE_TASKS["cola"], glue_root)  # no header: first row is data
    first = "Our friends won't buy this analysis, let alone the next one we propose."
    assert cola.texts[0] == (first,)
    assert cola.labels[0] == 1


def test_train_rows_that_appear_in_dev_are_dropped(glue_root):
    train, test = load_task(GLUE_TASKS["cola"], glue_root)
    kept, dropped = drop_test_overlap(train, test)
    assert dropped == 16  # documented in the data README
    assert not {r for r in kept.texts} & {r for r in test.texts}


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\ngood one\t1\nbroken row without tab\n")
    with pytest.raises(AtlasError, match=r"train.tsv line 3: expected 2 tab-separated fields"):
        read_examples(path, GLUE_TASKS["sst2"])


def test_label_outside_label_set_is_refused(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("sentence\tlabel\nfine\t0\nodd\t7\n")
    with pytest.raises(AtlasError, match=r"line 3: label '7' is not in the label set"):
        read_examples(path, GLUE_TASKS["sst2"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(AtlasError, match="data file not found: .*nope.tsv"):
        read_examples(tmp_path / "nope.tsv", GLUE_TASKS["sst2"])


def test_custom_task_from_jsonl_and_csv(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": "a", "y": "pos"}\n{"text": "b", "y": "neg"}\n')
    (tmp_path / "t.csv").write_text('text,y\n"hello, world",neg\n')
    jsonl = custom_task_spec(CustomTaskConfig("mine", str(tmp_path / "t.jsonl"),
                                              str(tmp_path / "t.jsonl"), format="jsonl",
                                              text_fields=("text",), label_field="y",
                                              label_names=("neg", "pos")))
    ex = read_examples(tmp_path / "t.jsonl", jsonl)
    assert ex.texts == [("a",), ("b",)] and ex.labels.tolist() == [1, 0]
    csv_spec = custom_task_spec(CustomTaskConfig("mine", "x", "x", format="csv",
                                                 text_fields=("text",), label_field="y",
                                                 label_names=("neg", "pos")))
    assert read_examples(tmp_path / "t.csv", csv_spec).texts == [("hello, world",)]


def test_unknown_task_lists_close_matches():
    with pytest.raises(AtlasError, match="unknown task 'sst3'; did you mean sst2"):
        resolve_tasks(("sst3",))


def test_registry_covers_all_glue_tasks():
    assert set(GLUE_TASKS) == {"sst2", "cola", "mrpc", "qnli", "rte", "stsb", "mnli", "qqp",
                               "wnli"}
    assert GLUE_TASKS["cola"].primary_metric == "mcc"
    assert GLUE_TASKS["mrpc"].metrics == ("f1", "accuracy")
    assert GLUE_TASKS["stsb"].is_regression
    assert GLUE_TASKS["stsb"].metrics == ("pearson", "spearman")
