"""``data=hf``: a local dataset and a tokenizer, tokenized once (cached on disk) and packed into samples.

``HFTextDataModule`` reads ``path`` with the ``datasets`` library, tokenizes ``text_field`` (or, for chat,
formats ``messages_field`` with the tokenizer's chat template, labels only on the assistant's tokens) in
``num_proc`` processes with ``Dataset.map`` (its progress bar and its cache), ends every document with EOS
and packs the documents into ``seq_len`` samples (:mod:`.hf_packing`). The result (flat token arrays and
the packing plan) is kept under ``cache_dir``, keyed by the files' fingerprint, the tokenizer, ``seq_len``,
the packing and the split: a re-run or a resume loads it and tokenizes nothing. Samples are a pure function
of their index, so the step-indexed sampler replays a resumed run exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .hf_packing import PACKINGS, PackedPlanDataset, pack
from .hf_source import check_fields, fingerprint, load_documents, load_tokenizer, tokenizer_hash
from .module import RingDataModule

log = logging.getLogger("ring_plugin.data")
# Bumped when the cached files' meaning changes, so an old cache is never read as a new one.
CACHE_FORMAT = 1
SPLITS = ("train", "val")


def _tokenize_batch(batch: dict[str, list], tokenizer: Any, field: str, chat: bool) -> dict[str, list]:
    """``Dataset.map`` function: token ids ending with EOS (and, for chat, the assistant mask) per document."""
    eos = tokenizer.eos_token_id
    ids_out, mask_out = [], []
    if chat:
        encoded = tokenizer.apply_chat_template(batch[field], tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
        rows = zip(encoded["input_ids"], encoded["assistant_masks"])
    else:
        encoded = tokenizer(batch[field], return_attention_mask=False)
        rows = ((ids, None) for ids in encoded["input_ids"])
    for ids, mask in rows:
        ids, mask = list(ids), list(mask) if mask is not None else None
        if not ids or ids[-1] != eos:
            ids.append(eos)
            if mask is not None:
                mask.append(mask[-1] if mask else 0)  # the EOS closing an assistant turn is the assistant's
        ids_out.append(ids)
        mask_out.append(mask)
    out: dict[str, list] = {"input_ids": ids_out}
    if chat:
        out["loss_mask"] = mask_out
    return out


def _write_split(dataset: Any, tokenizer: Any, field: str, chat: bool, num_proc: int, out: Path, split: str,
                 seq_len: int, packing: str, seed: int) -> None:
    """Tokenize ``dataset`` (Dataset.map, cached in ``out``), write its flat arrays and its packing plan."""
    import pyarrow.compute as pc

    procs = max(1, min(num_proc, len(dataset)))
    tokenized = dataset.map(_tokenize_batch, batched=True, num_proc=procs if procs > 1 else None,
                            remove_columns=dataset.column_names, cache_file_name=str(out / f"{split}.map.arrow"),
                            fn_kwargs={"tokenizer": tokenizer, "field": field, "chat": chat},
                            desc=f"Tokenizing {split}")
    ids = tokenized.data.column("input_ids")
    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    np.save(out / f"{split}.offsets.npy", offsets)
    columns = [("input_ids", np.uint32, "tokens")] + ([("loss_mask", np.uint8, "mask")] if chat else [])
    for column, dtype, name in columns:
        flat = np.lib.format.open_memmap(out / f"{split}.{name}.npy", mode="w+", dtype=dtype, shape=(int(offsets[-1]),))
        at = 0
        for chunk in tokenized.data.column(column).chunks:
            values = pc.list_flatten(chunk).to_numpy(zero_copy_only=False)
            flat[at:at + len(values)] = values
            at += len(values)
        flat.flush()
        del flat
    if chat and not np.load(out / f"{split}.mask.npy", mmap_mode="r").any():
        raise ValueError("the tokenizer's chat template marks no assistant tokens, so nothing would be learned: "
                         "its assistant turns need {% generation %} ... {% endgeneration %} blocks")
    pieces, bounds = pack(lengths, seq_len, packing, seed)
    np.save(out / f"{split}.pieces.npy", pieces)
    np.save(out / f"{split}.bounds.npy", bounds)
    for f in out.glob(f"{split}.map*.arrow"):  # the flat arrays hold everything now
        f.unlink()


class HFTextDataModule(RingDataModule):
    """``path``: a local file or folder that ``datasets`` reads (jsonl, json, parquet, csv, txt, or a
    ``save_to_disk`` folder); ``tokenizer``: a local ``AutoTokenizer`` folder; validation from ``val_path``
    or the seeded ``val_fraction`` of the documents (0: none); ``packing``: ``bfd`` or ``greedy``;
    ``cache_dir``: where tokenized data is kept (null: ``<HF datasets cache>/ring_plugin``)."""

    def __init__(self, path: str, tokenizer: str | None = None, seq_len: int = 2048, val_path: str | None = None,
                 val_fraction: float = 0.01, text_field: str = "text", messages_field: str | None = None,
                 num_proc: int = 4, packing: str = "bfd", cache_dir: str | None = None, batch_size: int = 1,
                 val_batches: int = 4, num_workers: int = 0, seed: int = 0):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
            raise ValueError(f"seq_len={seq_len!r} must be a positive integer")
        if packing not in PACKINGS:
            raise ValueError(f"packing={packing!r} is not a packing; valid: {', '.join(PACKINGS)}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must lie in [0, 1)")
        if isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc <= 0:
            raise ValueError(f"num_proc={num_proc!r} must be a positive integer")
        self.tokenizer = load_tokenizer(tokenizer, messages_field)
        self.tokenizer_path = str(Path(tokenizer).expanduser())  # type: ignore[arg-type]
        self.seq_len = seq_len
        settings = {"format": CACHE_FORMAT, "files": fingerprint([path]), "val_files": fingerprint([val_path]),
                    "tokenizer": tokenizer_hash(self.tokenizer), "seq_len": seq_len, "packing": packing,
                    "field": messages_field or text_field, "chat": bool(messages_field),
                    "val_fraction": None if val_path else val_fraction, "seed": seed}
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
        root = Path(cache_dir).expanduser() if cache_dir else _default_cache()
        self.cache_path = root / key
        self.tokenized_now = False  # set by _build when this process tokenized
        self._build(root, settings, path, val_path, text_field, messages_field, num_proc, val_fraction, seed)
        splits = {s: self._split(s) for s in SPLITS if (self.cache_path / f"{s}.tokens.npy").exists()}
        total = int(splits["train"].offsets[-1])
        if total < seq_len:
            raise ValueError(f"seq_len={seq_len} is more than the {total} tokens of path={path!r}: no sample can be "
                             "filled; lower seq_len or add documents")
        super().__init__(splits["train"], splits.get("val"), batch_size, val_batches, num_workers)
        # Saved in checkpoints: ring-export finds the run's tokenizer there.
        self.save_hyperparameters({"path": path, "tokenizer": self.tokenizer_path, "packing": packing,
                                   "text_field": text_field, "messages_field": messages_field})

    def _build(self, root: Path, settings: dict[str, Any], path: str, val_path: str | None, text_field: str,
               messages_field: str | None, num_proc: int, val_fraction: float, seed: int) -> None:
        from filelock import FileLock

        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / f"{self.cache_path.name}.lock")):  # the ranks of one node tokenize once
            if (self.cache_path / "meta.json").is_file():
                log.info(f"[data] tokenized data from the cache {self.cache_path} (nothing to tokenize)")
                return
            work = root / f"{self.cache_path.name}.partial"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            raw = root / "raw"
            train = load_documents(path, raw)
            check_fields(train, path, text_field, messages_field)
            val = None
            if val_path:
                val = load_documents(val_path, raw)
                check_fields(val, val_path, text_field, messages_field)
            elif val_fraction > 0:
                if len(train) < 2:
                    raise ValueError(f"path={path!r} holds {len(train)} document: too few to set val_fraction="
                                     f"{val_fraction} of them aside; give val_path or val_fraction=0")
                parts = train.train_test_split(test_size=val_fraction, seed=seed)
                train, val = parts["train"], parts["test"]
            field = messages_field or text_field
            for split, dataset in (("train", train), ("val", val)):
                if dataset is not None:
                    _write_split(dataset, self.tokenizer, field, bool(messages_field), num_proc, work, split,
                                 self.seq_len, settings["packing"], seed)
            (work / "meta.json").write_text(json.dumps(settings, indent=1))
            os.replace(work, self.cache_path)
            self.tokenized_now = True
            log.info(f"[data] tokenized {len(train)} documents of {path} into {self.cache_path}")

    def _split(self, split: str) -> PackedPlanDataset:
        def part(name: str) -> np.ndarray:
            return np.load(self.cache_path / f"{split}.{name}.npy", mmap_mode="r", allow_pickle=False)

        mask = part("mask") if (self.cache_path / f"{split}.mask.npy").exists() else None
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return PackedPlanDataset(part("tokens"), np.asarray(part("offsets")), np.asarray(part("pieces")),
                                 np.asarray(part("bounds")), self.seq_len, int(pad), mask)


def _default_cache() -> Path:
    from datasets import config

    return Path(config.HF_DATASETS_CACHE) / "ring_plugin"
