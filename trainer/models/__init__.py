"""HSAE architectures, one module each, behind one registry."""

from trainer.models import moe, topk, tree  # noqa: F401  (each module registers its class)
from trainer.models.base import HSAE, LevelCode, SaeLensLevel, StepOutput
from trainer.models.registry import architectures, build_model, model_class

__all__ = ["HSAE", "LevelCode", "SaeLensLevel", "StepOutput", "architectures", "build_model", "model_class"]
