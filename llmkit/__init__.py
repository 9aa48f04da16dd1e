"""llmkit: a complete, hackable LLM toolkit on PyTorch."""
from llmkit.chat import ChatSession, ask
from llmkit.config import PRESETS, ModelConfig, preset
from llmkit.data import RandomWindowSampler, load_split, prepare
from llmkit.embed import embed_texts
from llmkit.encoders import load_encoder, save_encoder
from llmkit.errors import LlmkitError
from llmkit.evaluate import perplexity
from llmkit.generate import (SamplingParams, apply_repetition_penalty, generate, sample_next, stream,
                             top_k_filter, top_p_filter)
from llmkit.model.decoder import GPT
from llmkit.model.encoder import Encoder, EncoderConfig
from llmkit.models import DEFAULT_MODEL, convert, resolve_model
from llmkit.tasks import finetune
from llmkit.tokenizer import Tokenizer
from llmkit.train import Trainer, TrainConfig

__version__ = "0.1.0"
