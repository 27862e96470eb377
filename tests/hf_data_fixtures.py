"""Test inputs for ``data=hf``: generated documents and chats as jsonl, and a tiny byte-level BPE tokenizer
trained with ``tokenizers`` and wrapped as a transformers tokenizer (with a chat template that marks the
assistant's tokens with ``{% generation %}``)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from lightning.pytorch.callbacks import Callback

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega red green blue river stone cloud seven eleven").split()
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] }}<|eos|>{% endgeneration %}"
    "{% else %}<|user|>{{ m['content'] }}{% endif %}"
    "{% endfor %}"
)


def documents(count: int, seed: int = 0, min_words: int = 3, max_words: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(count)]


def chats(count: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    return [[{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 8)))},
             {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 8)))}]
            for _ in range(count)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_tokenizer(folder: Path, vocab_size: int = 128, eos: bool = True, chat: bool = False) -> Path:
    """A byte-level BPE tokenizer trained on :func:`documents`, saved with ``save_pretrained`` in ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|eos|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents(200, seed=99), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>" if eos else None)
    if chat:
        wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(folder)
    return folder



class BatchRecorder(Callback):
    """For ring-train runs in tests: appends each training step's (sharded) input ids to ``<path>/rank<R>.jsonl``,
    so a test can compare the samples a resumed run trains on with the expected ones."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "input_ids": batch["input_ids"].tolist()}) + "\n")
