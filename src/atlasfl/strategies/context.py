"""What every part of a method reads and never changes: the clients, the config, the model."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

from atlasfl.config import ExperimentConfig
from atlasfl.devices import DeviceProfile, known_profiles
from atlasfl.errors import AtlasError
from atlasfl.models.lora import lora_scaling
from atlasfl.phases.memory import ModelDims
from atlasfl.strategies.info import ClientInfo, ModelInfo
from atlasfl.types import ClientId


class Context:
    """The fixed facts of a run as the server sees them, shared by the parts of a method."""

    def __init__(self, method: str, clients: Sequence[ClientInfo], cfg: ExperimentConfig,
                 model: ModelInfo):
        self.method = method
        self.clients = {c.client_id: c for c in clients}
        self.cfg = cfg
        self.model = model

    @cached_property
    def dims(self) -> ModelDims:
        """The memory model's dimensions (rank planning and split learning need them)."""
        if self.model.dims is None:
            raise AtlasError(f"method {self.method} needs a memory model of the architecture; "
                             f"see atlasfl.phases.memory.model_dims for the supported ones")
        return self.model.dims

    @cached_property
    def devices(self) -> dict[ClientId, DeviceProfile]:
        """Each client's device profile (the name it reported)."""
        profiles = known_profiles(self.cfg.devices)
        return {cid: profiles[info.device] for cid, info in self.clients.items()}

    @cached_property
    def initial_ranks(self) -> dict[str, int]:
        """What every client holds before any rank map: ``model.lora.r`` in every module."""
        return dict.fromkeys(self.model.shapes, self.cfg.model.lora.r)

    def scaling(self, rank: int) -> float:
        """The LoRA scaling every client applies at ``rank``."""
        lora = self.cfg.model.lora
        return lora_scaling(lora.alpha, rank, rslora=lora.rslora)
