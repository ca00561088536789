"""Experiment configuration: frozen dataclasses mirrored by YAML, with dotted overrides.

``schema`` holds the dataclasses, ``load`` reads YAML and ``--set key=value`` overrides into a
checked config (choices from their ``Literal`` types, unknown keys refused with close matches),
``validate`` checks ranges. The resolved config is written into the run folder, so a run can be
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
from atlasfl.config.schema import (
    ClusteringConfig,
    CustomTaskConfig,
    DataConfig,
    DeviceProfileConfig,
    DevicesConfig,
    ExperimentConfig,
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
from atlasfl.config.validate import validate

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
