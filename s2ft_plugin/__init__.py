"""S²FT (Structured Sparse Fine-Tuning) as a PEFT method: ``import s2ft_plugin`` registers the PEFT type "S2FT"."""

from peft.utils import register_peft_method

from ._peft_type import ensure_peft_type
from .calibration import initialize_s2ft_selection
from .config import S2FTConfig
from .hotswap import hotswap_adapter
from .layer import Linear, S2FTLayer
from .model import S2FTModel
from .transactions import install as _install_transactions

__all__ = ["Linear", "S2FTConfig", "S2FTLayer", "S2FTModel", "hotswap_adapter", "initialize_s2ft_selection"]

ensure_peft_type("S2FT")
register_peft_method(name="s2ft", config_cls=S2FTConfig, model_cls=S2FTModel, prefix="s2ft_")
_install_transactions()
