"""Idefics2 for vLLM: `pip install` this beside vLLM and `vllm serve /path/to/idefics2-8b` works.

vLLM runs `register` in each of its processes (entry point group `vllm.general_plugins`); the
model module is named, not imported, so that vLLM imports it only where it builds the model.
"""


def register() -> None:
    from vllm import ModelRegistry

    ModelRegistry.register_model("Idefics2ForConditionalGeneration",
                                 "idefics2_vllm.model:Idefics2ForConditionalGeneration")
