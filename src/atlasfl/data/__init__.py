"""Tasks, readers, partitioning and metrics."""

from atlasfl.data.glue import Examples, load_task, read_examples, resolve_data_root
from atlasfl.data.metrics import compute_metrics, majority_baseline
from atlasfl.data.partition import ClientSplit, drop_test_overlap, partition
from atlasfl.data.tasks import GLUE_TASKS, TaskSpec, resolve_tasks

__all__ = [
    "GLUE_TASKS", "ClientSplit", "Examples", "TaskSpec", "compute_metrics", "drop_test_overlap",
    "load_task", "majority_baseline", "partition", "read_examples", "resolve_data_root",
    "resolve_tasks",
]
