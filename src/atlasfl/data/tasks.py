"""Task registry: every GLUE task, plus user-defined tasks from config.

A ``TaskSpec`` says where a task's files are, which columns hold text and label, the label set in
class order, and the metrics GLUE reports for it (the first is the task's primary metric).
"""

from __future__ import annotations

from dataclasses import dataclass

from atlasfl.config import CustomTaskConfig
from atlasfl.errors import AtlasError, choices, unknown_name
from atlasfl.types import MetricName

METRICS: tuple[str, ...] = choices(MetricName)


@dataclass(frozen=True)
class TaskSpec:
    """How to read one task and how to score it."""

    name: str
    text_fields: tuple[str, ...]  # one (single sentence) or two (sentence pair) columns
    label_field: str
    num_labels: int  # 1 = regression
    label_names: tuple[str, ...]  # raw label values in class order; () for regression
    metrics: tuple[str, ...]  # the first is the primary metric
    train_file: str  # relative to the data root, or absolute for custom tasks
    test_file: str
    format: str = "tsv"
    columns: tuple[str, ...] | None = None  # for header-less files (CoLA)
    hf_config: str | None = None  # Hugging Face `nyu-mll/glue` config name
    hf_test_split: str = "validation"
    hf_text_fields: tuple[str, ...] | None = None  # column names in the HF copy, when they differ

    @property
    def is_regression(self) -> bool:
        """Whether the task is scored as regression (one output)."""
        return self.num_labels == 1

    @property
    def primary_metric(self) -> str:
        """The metric the task is ranked by."""
        return self.metrics[0]


_BIN = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("sst2", ("sentence",), "label", 2, _BIN, ("accuracy",),
                 "SST-2/train.tsv", "SST-2/dev.tsv", hf_config="sst2"),
        TaskSpec("cola", ("sentence",), "label", 2, _BIN, ("mcc", "accuracy"),
                 "CoLA/train.tsv", "CoLA/dev.tsv",
                 columns=("source", "label", "original_label", "sentence"), hf_config="cola"),
        TaskSpec("mrpc", ("#1 String", "#2 String"), "Quality", 2, _BIN, ("f1", "accuracy"),
                 "MRPC/train.tsv", "MRPC/dev.tsv", hf_config="mrpc",
                 hf_text_fields=("sentence1", "sentence2")),
        TaskSpec("qnli", ("question", "sentence"), "label", 2, _NLI2, ("accuracy",),
                 "QNLI/train.tsv", "QNLI/dev.tsv", hf_config="qnli"),
        TaskSpec("rte", ("sentence1", "sentence2"), "label", 2, _NLI2, ("accuracy",),
                 "RTE/train.tsv", "RTE/dev.tsv", hf_config="rte"),
        TaskSpec("stsb", ("sentence1", "sentence2"), "score", 1, (), ("pearson", "spearman"),
                 "STS-B/train.tsv", "STS-B/dev.tsv", hf_config="stsb"),
        TaskSpec("mnli", ("sentence1", "sentence2"), "gold_label", 3,
                 ("entailment", "neutral", "contradiction"), ("accuracy",),
                 "MNLI/train.tsv", "MNLI/dev_matched.tsv", hf_config="mnli",
                 hf_test_split="validation_matched", hf_text_fields=("premise", "hypothesis")),
        TaskSpec("qqp", ("question1", "question2"), "is_duplicate", 2, _BIN, ("f1", "accuracy"),
                 "QQP/train.tsv", "QQP/dev.tsv", hf_config="qqp"),
        TaskSpec("wnli", ("sentence1", "sentence2"), "label", 2, _BIN, ("accuracy",),
                 "WNLI/train.tsv", "WNLI/dev.tsv", hf_config="wnli"),
    )
}


def custom_task_spec(cfg: CustomTaskConfig) -> TaskSpec:
    """Turn a user-defined task from config into a ``TaskSpec``."""
    if cfg.metric not in METRICS:
        raise unknown_name(f"metric of custom task {cfg.name!r}", cfg.metric, METRICS)
    regression = cfg.num_labels == 1
    if regression and cfg.metric not in ("pearson", "spearman"):
        raise AtlasError(f"custom task {cfg.name!r}: num_labels 1 (regression) needs metric "
                         f"pearson or spearman, got {cfg.metric!r}")
    if not regression and cfg.metric in ("pearson", "spearman"):
        raise AtlasError(f"custom task {cfg.name!r}: metric {cfg.metric!r} needs num_labels 1")
    names = cfg.label_names or (() if regression else tuple(str(i) for i in range(cfg.num_labels)))
    if not regression and len(names) != cfg.num_labels:
        raise AtlasError(f"custom task {cfg.name!r}: label_names has {len(names)} entries but "
                         f"num_labels is {cfg.num_labels}")
    metrics = (cfg.metric,) if regression or cfg.metric == "accuracy" else (cfg.metric, "accuracy")
    return TaskSpec(cfg.name, tuple(cfg.text_fields), cfg.label_field, cfg.num_labels, names,
                    metrics, cfg.train, cfg.test, format=cfg.format)


def resolve_tasks(names: tuple[str, ...], custom: tuple[CustomTaskConfig, ...] = ()
                  ) -> list[TaskSpec]:
    """Look up task names in the GLUE registry and the user-defined tasks."""
    registry = dict(GLUE_TASKS)
    for ct in custom:
        if ct.name in GLUE_TASKS:
            raise AtlasError(f"custom task name {ct.name!r} shadows a GLUE task; rename it")
        registry[ct.name] = custom_task_spec(ct)
    out = []
    for name in names:
        if name not in registry:
            raise unknown_name("task", name, registry)
        out.append(registry[name])
    return out
