"""Fine-tuning a checkpoint on your own conversations: LoRA adapters (`idefics2.lora`) or every weight.

Modules: `data` (conversations and answer-only labels), `loop` (schedule, optimizer step, loss,
evaluation, processes), `run_folder` (history, resumable checkpoint, export), `flags` (CLI flags
from a config), `command` (`FinetuneConfig`, `finetune`, the `finetune` command). The command
runs as `idefics2 finetune`, `python -m idefics2.finetune` or under torchrun.
"""
