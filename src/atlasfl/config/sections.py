"""The sections of the experiment's configuration: frozen dataclasses, one per concern."""

from __future__ import annotations

from dataclasses import dataclass, field

from atlasfl.types import (
    ActivationDtype,
    ClusterMethod,
    Criterion,
    FileFormat,
    FingerprintParams,
    FingerprintStatistic,
    GraphKind,
    Grouping,
    LaplacianSpaceChoice,
    MetricName,
    MixedMethod,
    OnInfeasible,
    Partition,
    Pooling,
    Precision,
    RankBudget,
    RankUpdate,
    RankUtility,
    SplitMode,
    SplitWhen,
)


@dataclass(frozen=True)
class CustomTaskConfig:
    """A user-defined task read from local files (TSV, CSV or JSONL)."""

    name: str
    train: str
    test: str
    format: FileFormat = "tsv"
    text_fields: tuple[str, ...] = ("sentence",)
    label_field: str = "label"
    num_labels: int = 2  # 1 = regression
    label_names: tuple[str, ...] = ()  # raw label values in class order; default "0".."n-1"
    metric: MetricName = "accuracy"


@dataclass(frozen=True)
class DataConfig:
    """Which tasks, where their files are and how they are split over clients."""

    tasks: tuple[str, ...] = ("sst2", "mrpc", "cola", "qnli")
    data_dir: str | None = None
    clients_per_task: int = 3
    samples: int = 200  # examples per client, its local test and validation rows included
    # per task, a different number of examples per client ({cola: 2000}); others get samples
    task_samples: dict[str, int] = field(default_factory=dict)
    eval_samples: int = 500  # shared test examples per task (GLUE dev split); 0 = all
    val_fraction: float = 0.1  # of each client's examples, held out for validation (choices)
    # of each client's examples, held out as its local test (drawn like its own rows, stratified
    # by class): the personalised score, never trained on and never used to choose anything
    test_fraction: float = 0.2
    partition: Partition = "iid"
    alpha: float = 0.5  # Dirichlet concentration (partition: dirichlet)
    max_length: int = 128
    custom_tasks: tuple[CustomTaskConfig, ...] = ()


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter settings (applied through peft)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()  # empty: the architecture family's default
    rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r


@dataclass(frozen=True)
class ModelConfig:
    """Backbone, pooling and adapter."""

    name: str = "minilm"
    pooling: Pooling = "auto"
    head_dropout: float = 0.1
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass(frozen=True)
class TrainConfig:
    """Local training on each client."""

    local_epochs: int = 1
    local_steps: int = 0  # > 0: this many optimizer steps per round instead of epochs
    batch_size: int = 16
    lr: float = 5e-4  # adapter learning rate
    head_lr: float | None = None  # classification head learning rate; None: same as lr
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    # FedProx's mu (method fedprox): each batch's loss adds mu/2 ||w - w_received||^2 over the
    # adapter and head; Li et al. (arXiv:1812.06127) tried 0.001 to 1
    prox_mu: float = 0.01
    eval_batch_size: int = 64
    precision: Precision = "auto"  # auto: bf16 autocast where it is fast (CUDA, bf16 CPUs)
    # speed and memory, measured on quick.yaml (README "Speed and memory"): rows sorted by length
    # within seeded chunks of this many batches (0: off), and padded lengths rounded up to a
    # multiple of pad_multiple, so activations come in few shapes and memory stays flat
    length_bucket: int = 8
    pad_multiple: int = 16
    threads: int = 0  # torch intra-op threads; 0 = the cores this process may use
    # processes answering clients' plans on a CPU, each with threads // workers torch threads and
    # its own copy of the model: 1 = this process; 0 (auto) = one per core (train.threads) on a
    # CPU, 1 on a GPU. Off by default: on 2 cores it barely helped (README "Speed and memory")
    workers: int = 1
    mmap_threshold_kb: int = 0  # > 0: glibc serves allocations above it by mmap (flat memory)
    # oneDNN primitives kept per process (ONEDNN_PRIMITIVE_CACHE_CAPACITY and PyTorch's
    # LRU_CACHE_CAPACITY, unless set in the environment): bf16 on CPU builds one per shape, and
    # the libraries' 1024 held ~0.7-1 GB on the main job; 64 measured as fast as 1024 there, 8
    # slower (per-module ranks bring many shapes). 0: theirs (1024)
    onednn_cache: int = 64
    # > 0: clients of one exchange whose whole-model Train plans give the same batch sizes
    # train together, at most this many per group, as one forward/backward over their stacked
    # adapters (atlasfl.client.batched; for GPUs). Exact with dropout off; with dropout on the
    # masks come from the group's seed, not each client's. 0: each client on its own
    batch_clients: int = 0


@dataclass(frozen=True)
class FederationConfig:
    """The round loop."""

    rounds: int = 5
    fraction: float = 1.0  # share of clients sampled to train each round
    eval_every: int = 1  # evaluate every N rounds (and always after the last)
    # > 0: early stopping on validation, client by client. The run ends once no client's
    # validation metric has improved for this many evaluations, and the summary reports each
    # client's evaluation best on its validation rows (``rounds`` is then the most it trains);
    # 0: the last round is reported
    patience: int = 0
    resident_clients: int = 0  # > 0: at most this many clients' state in memory, others on disk


@dataclass(frozen=True)
class ClusteringConfig:
    """Phase 1: gradient fingerprints and task clustering (``fedavg-cluster``, ``atlas``)."""

    samples: int = 128  # examples per client in its fingerprint
    batch_size: int = 16
    layers: int = 3  # the last L transformer blocks
    params: FingerprintParams = "lora"  # LoRA B factors | the frozen target weights
    statistic: FingerprintStatistic = "fisher"  # squared per-example gradients | the mean
    dim: int = 256  # projected dimension (the upload is dim x 4 bytes)
    center: bool = True  # subtract the mean fingerprint before the cosine geometry
    debias: bool = True  # subtract each fingerprint's uploaded noise variance from its norm
    criteria: tuple[Criterion, ...] = ("silhouette",)  # which criteria vote on k (mean rank);
    # all four are recorded for every k
    min_signal: float = 0.7  # k is chosen among clients whose fingerprint is >= 70% signal
    method: ClusterMethod = "kmeans"
    k: int = 0  # 0: choose k; > 0: fixed
    k_min: int = 2
    k_max: int = 10
    recluster_every: int = 0  # re-cluster from fresh fingerprints every R rounds (0: never)
    epsilon: float = 0.0  # example-level DP budget of each fingerprint; 0: no noise
    delta: float = 1e-5
    clip: float = 1.0  # per-example norm bound (with epsilon)


@dataclass(frozen=True)
class DeviceProfileConfig:
    """A user-defined device profile (``devices.custom``)."""

    name: str
    memory_gb: float  # memory a training process may use, GiB
    compute: float = 1.0  # training throughput relative to laptop-8gb
    uplink_mbps: float = 10.0
    downlink_mbps: float = 50.0


@dataclass(frozen=True)
class DevicesConfig:
    """Which device each client runs on (Phase 2). Drawn at random, seeded, never by index."""

    profiles: tuple[str, ...] = ("cpu-2gb", "tablet-4gb", "laptop-8gb", "gpu-16gb")
    assignment: tuple[str, ...] = ()  # explicit profile per client id; empty: draw from profiles
    custom: tuple[DeviceProfileConfig, ...] = ()


@dataclass(frozen=True)
class RanksConfig:
    """Phase 2: per-module LoRA ranks under each client's memory; mixed-rank aggregation."""

    aggregation: MixedMethod = "stack"
    # average: the mean of what the clients hold | delta: previous aggregate + the clients'
    # weighted change (the server keeps what a client's ranks cut off)
    update: RankUpdate = "average"
    grouping: Grouping = "task"
    r_min: int = 1
    r_max: int = 16
    # linear: sum importance x rank | log: sum importance x log(rank) | spectrum: the gradient
    # energy each module's ranks can follow (clients upload their top r_max singular values)
    # (spectrum, with the device budget, is the pair that met Phase 2's targets: the default)
    utility: RankUtility = "spectrum"
    # parity: <= homolora's LoRA parameters at model.lora.r | device: the federation's total of
    # those, shared in proportion to device memory | memory: the memory budget only
    budget: RankBudget = "device"
    on_infeasible: OnInfeasible = "error"  # exclude: the client trains nothing
    samples: int = 64  # importance examples per client when Phase 1 does not run


@dataclass(frozen=True)
class SplitConfig:
    """Phase 3: split learning (``splitlora``; ``homolora``/``hetlora`` with ``enabled``)."""

    # never | always: every client | auto: only clients whose device cannot hold the model
    enabled: SplitWhen = "auto"
    mode: SplitMode = "vanilla"  # u-shape: the last ``tail`` blocks, head, loss stay on the client
    cut: str = "auto"  # blocks the client keeps first: an integer, or auto (fits, least time)
    tail: int = 1  # u-shape: blocks at the end the client keeps
    min_cut: int = 1  # privacy floor: shallow activations are easier to invert
    activation_dtype: ActivationDtype = "fp32"  # what crosses the network each batch
    # batches whose activations (and gradients) travel in one message: 1 = sequential split
    # learning; K > 1: K-fold fewer round trips, the client's forwards up to K-1 steps stale
    window: int = 1
    server_compute: float = 20.0  # the server's throughput relative to laptop-8gb (auto cut)

    @property
    def fixed_cut(self) -> int | None:
        """The configured cut, or None for auto."""
        return None if self.cut == "auto" else int(self.cut)


@dataclass(frozen=True)
class LaplacianConfig:
    """Phase 4: the client graph and MIRA's Laplacian step (``atlas``, ``mira``)."""

    graph: GraphKind = "rbf"  # rbf: median-distance bandwidth | knn: the k most similar
    k: int = 3  # neighbours per client (knn, and the edges across clusters)
    cross_weight: float = 0.0  # weight factor of kNN edges across clusters (0: none)
    # step size of the server's Laplacian step: a number, or auto = 1 / the largest eigenvalue
    # of L, so that lam is in graph-free units: the step is stable for lam < 2, and lam = 1 on
    # a complete graph of unit weights gives every client the mean (FedAvg within the cluster)
    eta: str = "auto"
    lam: float = 1.0  # strength of the graph penalty (0: every client keeps its model: local)
    # factors: A, B and head as they are (equal ranks) | product: s B A, re-factorised to each
    # client's ranks (mixed ranks) | auto: factors when every client has the same ranks
    space: LaplacianSpaceChoice = "auto"

    @property
    def fixed_eta(self) -> float | None:
        """The configured step size, or None for auto."""
        return None if self.eta == "auto" else float(self.eta)


@dataclass(frozen=True)
class SessionConfig:
    """How this session runs and saves; may change between sessions of one run."""

    max_rounds: int = 0  # stop after this many rounds in this session (0: run to the end)
    save_every: int = 1  # checkpoint every N rounds (0: only when stopping or finishing)
    keep_checkpoints: int = 2  # how many of the latest checkpoints to keep


@dataclass(frozen=True)
class FaultsConfig:
    """What the server refuses: every update is checked before any aggregation."""

    max_update_norm: float = 0.0  # > 0: refuse an update whose L2 norm (all tensors) exceeds it
    # simulated failures of sampled clients, drawn per (seed, round, client)
    drop_before: float = 0.0  # probability it vanishes before training (the plan never arrives)
    drop_during: float = 0.0  # probability it vanishes while training (nothing is uploaded)
    deadline_seconds: float = 0.0  # > 0: an update later than this (simulated) is discarded
    step_seconds: float = 0.5  # simulated seconds per optimizer step of a laptop-8gb
    jitter: float = 0.3  # lognormal sigma of a client's simulated time
