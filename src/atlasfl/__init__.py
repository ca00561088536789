"""atlasfl: federated multi-task LoRA fine-tuning of language models (ATLAS)."""

from atlasfl.config import ExperimentConfig, from_dict
from atlasfl.errors import AtlasError

__version__ = "0.1.0"
__all__ = ["AtlasError", "ExperimentConfig", "__version__", "from_dict"]
