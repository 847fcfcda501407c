"""codegpt: GPT-style autoregressive priors over discrete image codes, as transformers models.

The pieces, in the direction data flows: ``GPTConfig`` and ``GPT`` (the model, shipped as Hub remote
code), ``generate`` (sampling with a preallocated KV cache and guidance), ``Codebook`` (post-hoc
k-means codebooks) and ``CodeDataset`` (codes on disk), then ``codegpt.training`` and the ``codegpt``
command line.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .codebook import Codebook
from .configuration_codegpt import GPTConfig
from .data import CodeDataset, CodeDatasetWriter, load_code_dataset, write_code_dataset
from .fast import remove_cpu_kernels, use_cpu_kernels
from .modeling_codegpt import GPT, GPTOutput
from .sampling import generate, to_grid

__version__ = "0.1.0"

AutoConfig.register(GPTConfig.model_type, GPTConfig, exist_ok=True)
AutoModel.register(GPTConfig, GPT, exist_ok=True)
AutoModelForCausalLM.register(GPTConfig, GPT, exist_ok=True)

# A saved folder carries its code (auto_map + the two files) and loads with trust_remote_code=True
# where codegpt is not installed. register_for_auto_class records a single model class, so the
# AutoModelForCausalLM entry is added by GPT.save_pretrained.
GPTConfig.register_for_auto_class()
GPT.register_for_auto_class("AutoModel")

__all__ = [
    "GPT", "Codebook", "CodeDataset", "CodeDatasetWriter", "GPTConfig", "GPTOutput", "generate", "load_code_dataset",
    "remove_cpu_kernels", "to_grid", "use_cpu_kernels", "write_code_dataset",
]
