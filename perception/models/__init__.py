"""SegNet model zoo: every architecture is registered by name (``list_models()``, ``get_model()``)."""

from perception.models import fcn_basic, segnet, segnet_basic  # noqa: F401  (registers the architectures)
from perception.models.bayesian import MCPrediction, has_dropout, mc_dropout_predict
from perception.models.io import InputSpec, ModelCard, load, load_card, save
from perception.models.registry import get_model, list_models, model_config, register_model
from perception.models.unpool import list_unpool_impls, set_unpool_impl

__all__ = [
    "get_model",
    "list_models",
    "model_config",
    "register_model",
    "load",
    "load_card",
    "save",
    "ModelCard",
    "InputSpec",
    "mc_dropout_predict",
    "MCPrediction",
    "has_dropout",
    "set_unpool_impl",
    "list_unpool_impls",
]
