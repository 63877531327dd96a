"""`python -m idefics2.finetune ARGS` (and `torchrun ... -m idefics2.finetune ARGS`): `idefics2 finetune ARGS`."""

from idefics2.finetune.command import main

main()
