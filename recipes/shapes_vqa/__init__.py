"""The recipe that trained the shipped `shapes-vqa` model; not part of the installed package.

`presets` (model sizes), `synthetic` (the data), `tokenizer_training` (the byte-level BPE
tokenizer), `model_init` (initial weights), `data` (training batches), `grounding` (the vision
stage and the per-latent losses), `train` (the loop), `json_answers` (stage 5: JSON answers),
`evaluate` (held-out exact match), `stitch` (one model's vision tower under another's perceiver and
decoder), `plot_loss_curve`.
Run from the repository root: `python -m recipes.shapes_vqa.train ...` (docs/training.md).
"""
