"""Training: the small shipped "shapes" Idefics2 from scratch, and fine-tuning any checkpoint.

From scratch: `synthetic` makes the data, `tokenizer_training` the byte-level BPE tokenizer,
`grounding` the vision stage and the per-latent losses, `train` the loop and the `train` CLI
command, `evaluate` the held-out exact-match evaluation. Fine-tuning: `lora` (adapters, merging,
PEFT-format files) and `finetune` (the loop over a JSONL of conversations, one or several
processes). The inference path imports only `lora`, and only when `generate --adapter` asks for
it, so the runtime does not otherwise pay for this package.
"""
