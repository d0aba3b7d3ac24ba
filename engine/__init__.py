"""A pure-PyTorch LLM inference engine: `from engine import LLM, SamplingParams`."""
from engine.llm import LLM
from engine.outputs import CompletionOutput, RequestOutput, Usage
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Usage"]
