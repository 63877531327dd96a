"""Training the small shipped "shapes" Idefics2 from scratch.

`synthetic` makes the data, `tokenizer_training` the byte-level BPE tokenizer, `train` the loop and
the `train` CLI command, `evaluate` the held-out exact-match evaluation. Nothing here is imported by
the inference path, so the runtime does not pay for it.
"""
