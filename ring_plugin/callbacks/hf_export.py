"""``HFExport``: at the end of training, the trained transformers model as a ``save_pretrained`` folder.

Every rank takes part in gathering ZeRO-3 partitions (DDP and ZeRO 0-2 hold full weights already); global
rank 0 writes ``output_dir`` (safetensors, config, generation config, and the tokenizer of ``data=hf`` or of
the pretrained folder).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("ring_plugin.app")


class HFExport(Callback):
    def __init__(self, output_dir: str):
        self.output_dir = Path(output_dir)
        self.written: Path | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        if trainer.fast_dev_run or model is None or not hasattr(model, "save_pretrained"):
            return
        from ..hf.export import gathered_state_dict, save_hf_folder, tokenizer_or_none  # needs transformers

        keep = trainer.is_global_zero
        state_dict = gathered_state_dict(model, keep)
        if keep:
            tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
            if tokenizer is None:
                tokenizer = tokenizer_or_none(pl_module.hparams.get("pretrained"))
            self.written = save_hf_folder(model, state_dict, tokenizer, self.output_dir)
            log.info(f"[ring-train] Hugging Face model folder: {self.written} "
                     f"(AutoModelForCausalLM.from_pretrained({str(self.written)!r}))")
        trainer.strategy.barrier("ring_hf_export")
