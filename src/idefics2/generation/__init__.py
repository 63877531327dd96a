"""Generation: a `Generator` per model runs `generate` over the model's stages.

Modules: `config` (GenerationConfig, its files, argument resolution and checks), `sampling`
(logits processors and token choice), `streaming` (text streamers), `vision_cache` (features of
images seen before), `threads` (CPU thread tuning), `steps` (the prefill and the one-token step),
`beam_search`, `constraints` (answers that follow a JSON schema, regex, choice list or grammar),
`outputs` (GenerateOutput and the per-step recording), `request` (a call's inputs and options
checked and made ready, the `Plan`), `generate` (the `Generator` and the greedy/sampled decode loop), `slot_cache` and `engine` (continuous batching for the server).
"""

from idefics2.generation.config import BUILTIN_DEFAULTS, GenerationConfig, load_generation_config
from idefics2.generation.constraints import Constraint, ConstraintProcessor
from idefics2.generation.generate import GenerateOutput, Generator
from idefics2.generation.steps import decode_step
from idefics2.generation.streaming import TextIteratorStreamer
from idefics2.generation.threads import ThreadTuner
from idefics2.generation.vision_cache import VisionFeatureCache

__all__ = ["BUILTIN_DEFAULTS", "Constraint", "ConstraintProcessor", "GenerateOutput", "GenerationConfig",
           "Generator", "TextIteratorStreamer", "ThreadTuner", "VisionFeatureCache", "decode_step",
           "load_generation_config"]
