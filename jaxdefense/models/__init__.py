"""One decoder for Llama 2/3.x, Qwen2/2.5 and Qwen3; HF import/export, LoRA, KV-cache sampling."""

from jaxdefense.errors import CheckpointError
from jaxdefense.models.config import ModelConfig, config_from_hf, config_to_hf, named_config
from jaxdefense.models.decoder import forward, init_params, lm_loss, next_token_nll, param_shapes, token_nll
from jaxdefense.models.generate import generate, generate_text
from jaxdefense.models.hf import load_hf, save_hf
from jaxdefense.models.lora import lora_init
from jaxdefense.models.lora import merge as lora_merge
from jaxdefense.models.tokenizer import PLAIN_TEMPLATE, apply_chat, encode_prompts, load_tokenizer

__all__ = [
    "CheckpointError", "ModelConfig", "PLAIN_TEMPLATE", "apply_chat", "config_from_hf", "config_to_hf",
    "encode_prompts", "forward", "generate", "generate_text", "init_params", "lm_loss", "load_hf",
    "load_tokenizer", "lora_init", "lora_merge", "named_config", "next_token_nll", "param_shapes",
    "save_hf", "token_nll",
]
