"""Experiment configuration: frozen dataclasses mirrored by YAML, with dotted overrides.

``sections`` holds a dataclass per concern and ``schema`` the experiment's over them with its
range checks (``validate``); ``parse`` builds them from nested dicts (choices from their
``Literal`` types, unknown keys refused with close matches), ``load`` reads YAML and
``--set key=value`` overrides. The resolved config is written into the run folder, so a run can be
reproduced from it.
"""

from atlasfl.config.load import (
    EARLIER_DEFAULTS,
    METHOD_SETTINGS,
    RESUMABLE_KEYS,
    apply_overrides,
    check_same_experiment,
    complete_saved,
    experiment_diff,
    from_dict,
    from_yaml,
    layered,
    parse_overrides,
    precision_ran,
    set_dotted,
)
from atlasfl.config.schema import ExperimentConfig, validate
from atlasfl.config.sections import (
    ClusteringConfig,
    CustomTaskConfig,
    DataConfig,
    DeviceProfileConfig,
    DevicesConfig,
    FaultsConfig,
    FederationConfig,
    LaplacianConfig,
    LoraSettings,
    ModelConfig,
    RanksConfig,
    SessionConfig,
    SplitConfig,
    TrainConfig,
)

__all__ = ["EARLIER_DEFAULTS", "METHOD_SETTINGS", "RESUMABLE_KEYS", "ClusteringConfig",
           "CustomTaskConfig", "DataConfig",
           "DeviceProfileConfig", "DevicesConfig", "ExperimentConfig", "FaultsConfig",
           "FederationConfig", "LaplacianConfig",
           "LoraSettings", "ModelConfig", "RanksConfig", "SessionConfig", "SplitConfig",
           "TrainConfig",
           "apply_overrides", "check_same_experiment", "complete_saved", "experiment_diff",
           "from_dict",
           "from_yaml", "layered", "parse_overrides", "precision_ran", "set_dotted",
           "validate"]
