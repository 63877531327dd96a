"""Train the small byte-level BPE tokenizer of the shapes model on the synthetic conversation corpus.

Special tokens get the first ids (`<unk>` 0 = pad, `<s>` 1, `</s>` 2, then the three Idefics2 tokens),
so the text config can use the Mistral-style ids 0/1/2. A vocabulary of a few hundred entries turns
every word of the corpus into one or two tokens: short sequences, a small embedding table. The result
is our `Tokenizer`, saved in the Hub layout that `Idefics2Processor.from_pretrained` loads.
"""

from __future__ import annotations

import random
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from idefics2.processing.chat_template import DEFAULT_CHAT_TEMPLATE
from idefics2.processing.tokenizer import Tokenizer
from recipes.shapes_vqa.synthetic import sample_conversation

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<fake_token_around_image>", "<image>", "<end_of_utterance>")


def conversation_texts(seed: int, n: int) -> list[str]:
    """Chat-formatted text of `n` synthetic conversations, special tokens left out (they are atomic)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        sample = sample_conversation(rng)
        lines = []
        for message in sample.messages:
            words = " ".join(p["text"] for p in message["content"] if p["type"] == "text")
            lines.append(f"{message['role'].capitalize()}: {words}")
        texts.append("\n".join(lines) + "\nAssistant:")
    return texts


def train_tokenizer(seed: int = 0, vocab_size: int = 512, n_conversations: int = 3000) -> Tokenizer:
    """Byte-level BPE (no prefix space, so "\\nAssistant:" tokenizes the same anywhere), BOS added."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(conversation_texts(seed, n_conversations), trainer=trainer)
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
                     additional_special_tokens=list(SPECIAL_TOKENS[3:]), add_bos_token=True,
                     add_eos_token=False, padding_side="left", chat_template=DEFAULT_CHAT_TEMPLATE)


def main() -> None:
    """`python -m recipes.shapes_vqa.tokenizer_training OUT_DIR`: train and save the tokenizer files."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=512)
    args = parser.parse_args()
    train_tokenizer(args.seed, args.vocab_size).save_pretrained(args.out_dir)


if __name__ == "__main__":
    main()
