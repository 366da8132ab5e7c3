"""One decoder for Llama 2/3.x, Qwen2/2.5 and Qwen3; HF import/export, GGUF import, LoRA, KV-cache sampling.

The params layout (shapes, logical axes, init, HF keys, LoRA targets) is declared once in
`models.layout`. Chat formatting and prompt encoding are `jaxdefense.data.formatting`.
"""

from jaxdefense.errors import CheckpointError
from jaxdefense.models.config import ModelConfig, config_from_hf, config_to_hf, named_config
from jaxdefense.models.decoder import forward, lm_loss, next_token_nll, token_nll
from jaxdefense.models.generate import generate, generate_text
from jaxdefense.models.gguf import load_gguf
from jaxdefense.models.hf import load_hf, save_hf
from jaxdefense.models.layout import WEIGHTS, init_params, param_axes, param_shapes
from jaxdefense.models.lora import lora_init
from jaxdefense.models.lora import merge as lora_merge
from jaxdefense.models.pretrained import PRETRAINED, is_pretrained, pretrained_path
from jaxdefense.models.tokenizer import load_gguf_tokenizer, load_tokenizer

__all__ = [
    "CheckpointError", "ModelConfig", "PRETRAINED", "WEIGHTS", "config_from_hf", "config_to_hf", "forward", "generate",
    "generate_text", "init_params", "is_pretrained", "lm_loss", "load_gguf", "load_gguf_tokenizer", "load_hf",
    "load_tokenizer", "lora_init", "lora_merge", "named_config",
    "next_token_nll", "param_axes", "param_shapes", "pretrained_path", "save_hf", "token_nll",
]
