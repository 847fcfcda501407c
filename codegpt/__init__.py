"""codegpt: GPT-style autoregressive priors over discrete image codes, as transformers models."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_codegpt import GPTConfig
from .modeling_codegpt import GPT, GPTOutput

__version__ = "0.1.0"

AutoConfig.register(GPTConfig.model_type, GPTConfig, exist_ok=True)
AutoModel.register(GPTConfig, GPT, exist_ok=True)
AutoModelForCausalLM.register(GPTConfig, GPT, exist_ok=True)

# A saved folder carries its code (auto_map + the two files) and loads with trust_remote_code=True
# where codegpt is not installed. register_for_auto_class records a single model class, so the
# AutoModelForCausalLM entry is added by GPT.save_pretrained (see modeling_codegpt).
GPTConfig.register_for_auto_class()
GPT.register_for_auto_class("AutoModel")

__all__ = ["GPT", "GPTConfig", "GPTOutput"]
