"""MobileVLM redefined in TVM Relax `nn` modules."""

from .config import ImageProcessorConfig, MobileVLMConfig, TextConfig, VisionConfig
from .mobilevlm import MobileVLMForCausalLM

__all__ = ["ImageProcessorConfig", "MobileVLMConfig", "MobileVLMForCausalLM", "TextConfig", "VisionConfig"]
