"""``LongContextEval``: passkey retrieval inside real validation text, at each validation, on the ring.

For every context length in ``lengths`` and relative depth in ``depths`` it builds ``samples`` probes: the
validation documents' tokens (repeated if short) as the haystack, a needle (``The pass key is 48213.``) put
at that depth, and the question ``What is the pass key? The pass key is`` followed by the answer. One
teacher-forced forward pass on the ring per probe scores the answer tokens (no generation): exact match
(every answer token the argmax), and the answer's log-likelihood. The grid goes to every logger
(``long_context/acc/L<length>_d<depth>``, ``long_context/logp/...`` and their means) and, drawn as a
length x depth heat map, into ``output_dir/step<N>.png``.

Every probe is a pure function of ``(seed, length, depth, sample)``, so validations are comparable.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from ..comm.context import current_ring_context
from ..data.tasks import IGNORE_INDEX

log = logging.getLogger("ring_plugin.app")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = " What is the pass key? The pass key is"


class LongContextEval(Callback):
    def __init__(self, lengths: list[int], depths: list[float], output_dir: str, samples: int = 1,
                 key_digits: int = 5, seed: int = 0):
        if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in lengths):
            raise ValueError(f"lengths={lengths!r} must be a list of positive token counts")
        if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
            raise ValueError(f"depths={depths!r} must be a list of fractions in [0, 1]")
        if samples <= 0 or key_digits <= 0:
            raise ValueError(f"samples={samples} and key_digits={key_digits} must be positive")
        self.lengths, self.depths = sorted(lengths), list(depths)
        self.output_dir, self.samples, self.key_digits, self.seed = Path(output_dir), samples, key_digits, seed
        self.last: dict[str, float] = {}
        self._skip: str | None = None

    def _haystack_source(self, trainer: pl.Trainer) -> tuple[Any, np.ndarray] | None:
        """(tokenizer, the validation (else training) documents' tokens), or None without a tokenizer."""
        datamodule = trainer.datamodule
        tokenizer = getattr(datamodule, "tokenizer", None)
        dataset = getattr(datamodule, "val_set", None) or getattr(datamodule, "train_set", None)
        if tokenizer is None or not hasattr(dataset, "tokens"):
            return None
        return tokenizer, dataset.tokens

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        source = self._haystack_source(trainer)
        for length in self.lengths if source is not None else ():  # a length too short fails now, not mid-run
            self.probe(*source, length, 0.0, 0)

    def probe(self, tokenizer: Any, hay: np.ndarray, length: int, depth: float, sample: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels scoring only the answer) of one probe, ``length`` tokens long."""
        rng = np.random.default_rng([self.seed, length, int(depth * 1e6), sample])
        key = "".join(str(d) for d in rng.integers(0, 10, self.key_digits))
        key = str(rng.integers(1, 10)) + key[1:]  # no leading zero: the answer is the number as written
        needle = tokenizer(NEEDLE.format(key=key), add_special_tokens=False)["input_ids"]
        question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
        answer = tokenizer(" " + key, add_special_tokens=False)["input_ids"]
        room = length - len(needle) - len(question) - len(answer)
        if room < 0:
            raise ValueError(f"lengths: {length} tokens cannot hold the needle, question and answer "
                             f"({length - room} tokens)")
        start = int(rng.integers(0, max(1, len(hay) - room)))
        text = np.resize(np.asarray(hay[start:start + room], dtype=np.int64), room)  # repeated when short
        at = round(depth * room)
        ids = np.concatenate([text[:at], needle, text[at:], question, answer]).astype(np.int64)
        labels = np.full(length, IGNORE_INDEX, dtype=np.int64)
        labels[length - len(answer) - 1:length - 1] = answer
        return torch.from_numpy(ids), torch.from_numpy(labels)

    @torch.no_grad()
    def _score(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ids: torch.Tensor,
               labels: torch.Tensor) -> tuple[float, float]:
        """(exact match 0/1, answer log-likelihood) of one probe, from one forward pass on the ring."""
        n = ids.numel()
        batch = {"input_ids": ids[None], "labels": labels[None], "position_ids": torch.arange(n)[None],
                 "document_ids": torch.zeros(1, n, dtype=torch.long)}
        shard = trainer.strategy.batch_to_device(batch)  # this rank's shard, in the ring's layout
        hidden, head = pl_module.hidden_and_head(shard)
        scored = shard["labels"] != IGNORE_INDEX
        gather = _gathered(head)
        with gather:
            logits = hidden[scored].float() @ head.float().t()
        targets = shard["labels"][scored]
        logp = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).sum()
        sums = torch.stack([(logits.argmax(-1) == targets).sum().double(), scored.sum().double(), logp.double()])
        ring = current_ring_context()
        if ring is not None and ring.sequence_group is not None:  # the answer may sit on several ranks
            dist.all_reduce(sums, group=ring.sequence_group)
        right, count, total = sums.tolist()
        return float(right == count), total

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._skip:
            return
        source = self._haystack_source(trainer)
        if source is None:
            self._skip = "the data has no tokenizer (use data=hf)"
            log.info(f"[long-context eval] skipped: {self._skip}")
            return
        tokenizer, hay = source
        acc = np.zeros((len(self.lengths), len(self.depths)))
        logp = np.zeros_like(acc)
        for i, length in enumerate(self.lengths):
            for j, depth in enumerate(self.depths):
                for s in range(self.samples):
                    hit, ll = self._score(trainer, pl_module, *self.probe(tokenizer, hay, length, depth, s))
                    acc[i, j] += hit / self.samples
                    logp[i, j] += ll / self.samples
        self.last = {"long_context/acc": float(acc.mean()), "long_context/answer_logp": float(logp.mean())}
        for i, length in enumerate(self.lengths):
            for j, depth in enumerate(self.depths):
                self.last[f"long_context/acc/L{length}_d{depth:g}"] = float(acc[i, j])
                self.last[f"long_context/logp/L{length}_d{depth:g}"] = float(logp[i, j])
        for name, value in self.last.items():
            pl_module.log(name, value, rank_zero_only=True)
        if trainer.is_global_zero:
            path = self._heat_map(acc, logp, trainer.global_step)
            for logger in trainer.loggers:
                if isinstance(logger, pl.loggers.WandbLogger):  # the grid and its picture, at the trainer's step
                    logger.log_metrics(self.last, step=trainer.global_step)
                    logger.log_image(key="long_context/heat_map", images=[str(path)], step=trainer.global_step)

    def _heat_map(self, acc: np.ndarray, logp: np.ndarray, step: int) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * len(self.depths), 1.5 + 0.6 * len(self.lengths)))
        for ax, grid, title, cmap in ((axes[0], acc, "exact match", "RdYlGn"),
                                      (axes[1], logp, "answer log-likelihood", "viridis")):
            image = ax.imshow(grid, cmap=cmap, aspect="auto", vmin=0.0 if grid is acc else None,
                              vmax=1.0 if grid is acc else None)
            ax.set_xticks(range(len(self.depths)), [f"{d:.0%}" for d in self.depths])
            ax.set_yticks(range(len(self.lengths)), [f"{n:,}" for n in self.lengths])
            ax.set_xlabel("needle depth")
            ax.set_ylabel("context length (tokens)")
            ax.set_title(f"{title}, step {step}")
            fig.colorbar(image, ax=ax)
        fig.tight_layout()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / f"step{step:06d}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def _gathered(weight: torch.Tensor) -> Any:
    """A ZeRO-3 partitioned head weight, gathered (every rank calls this); otherwise nothing to do."""
    if not hasattr(weight, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([weight], modifier_rank=None)
