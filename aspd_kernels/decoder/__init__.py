"""The decoder of SPEC §6: a thin serial/parallel decoding loop over a Llama-family model that calls the ops."""
from .config import ModelConfig
from .engine import ParallelDecoder
from .model import Transformer
from .result import DecodeResult
from .sampling import Grammar, SamplingParams, sample

__all__ = ["ParallelDecoder", "DecodeResult", "ModelConfig", "Transformer", "Grammar", "SamplingParams", "sample"]
