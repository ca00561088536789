"""Shared type aliases, and the allowed values of every choice, declared once.

A ``Literal`` here is the one declaration of a choice: the config loader checks YAML values
against it (``atlasfl.config``) and the phases check their keyword arguments against it
(``atlasfl.errors.check_choice``), so a new value is added in one place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, TypeAlias

if TYPE_CHECKING:  # no torch at import: the config and report modules stay light
    from torch import Tensor

ClientId: TypeAlias = int
TaskId: TypeAlias = str
AdapterState: TypeAlias = "dict[str, Tensor]"  # tensor name -> tensor (adapter or head)
Metrics: TypeAlias = dict[str, float]

# -- data and training ---------------------------------------------------------------------
# every method of the registry (``atlasfl.strategies.methods``, tested to hold exactly these)
MethodName = Literal["local", "centralized", "fedavg", "fedavg-task", "fedavg-cluster", "fedprox",
                     "fedsa", "homolora", "hetlora", "splitlora", "mira", "atlas",
                     "atlas-no-laplacian", "atlas-no-split", "atlas-homo-rank",
                     "atlas-oracle-clusters"]
Partition = Literal["iid", "dirichlet"]
FileFormat = Literal["tsv", "csv", "jsonl"]
MetricName = Literal["accuracy", "f1", "mcc", "pearson", "spearman"]
HeadPooling = Literal["mean", "cls", "last"]
Pooling = Literal["auto", HeadPooling]  # auto: mean for encoders, last for decoders
Precision = Literal["auto", "fp32", "bf16"]
Shares = Literal["all", "lora_A"]  # what a trained client uploads (lora_A: FedSA-LoRA)

# -- Phase 1: fingerprints and clustering --------------------------------------------------
FingerprintParams = Literal["lora", "weights"]
FingerprintStatistic = Literal["fisher", "gradient"]
ClusterMethod = Literal["kmeans", "spectral"]
Criterion = Literal["silhouette", "davies_bouldin", "calinski_harabasz", "eigengap"]

# -- Phase 2: ranks and mixed-rank aggregation ---------------------------------------------
MixedMethod = Literal["zero-pad", "stack", "svd"]
RankUpdate = Literal["average", "delta"]
Grouping = Literal["global", "task", "cluster"]
RankUtility = Literal["linear", "log", "spectrum"]
ImportanceKind = Literal["norm", "spectrum"]
RankBudget = Literal["parity", "device", "memory"]
OnInfeasible = Literal["error", "exclude"]

# -- Phase 3: split learning ---------------------------------------------------------------
SplitWhen = Literal["never", "always", "auto"]  # auto: only clients that cannot hold the model
SplitMode = Literal["vanilla", "u-shape"]
ActivationDtype = Literal["fp32", "fp16", "bf16"]

# -- Phase 4: Laplacian personalisation ----------------------------------------------------
GraphKind = Literal["rbf", "knn"]
LaplacianSpace = Literal["factors", "product"]
LaplacianSpaceChoice = Literal["auto", LaplacianSpace]  # auto: factors when ranks are equal
