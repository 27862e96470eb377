"""Reading a local dataset and its tokenizer with the ``datasets`` and ``transformers`` libraries, checked.

Every error is one line that names the argument (``path=``, ``text_field=``, ``tokenizer=`` ...), raised
before anything is tokenized.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

# File suffixes the ``datasets`` library reads, and the builder that reads each.
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
# Files ``Dataset.save_to_disk`` writes: such a folder is read with ``load_from_disk``.
SAVED_MARKERS = ("dataset_info.json", "state.json")


def data_files(path: str | Path) -> list[Path]:
    """The files that make up ``path`` (a file, or every file of a folder), sorted; refuses a missing path."""
    root = Path(path).expanduser()
    if not root.exists():
        raise ValueError(f"path={str(path)!r} does not exist")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and
                                                 not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise ValueError(f"path={str(path)!r} is an empty folder")
    return files


def fingerprint(paths: list[str | Path | None]) -> list[list[Any]]:
    """What identifies the files' contents: name, size and modification time of each file."""
    out = []
    for path in paths:
        if path is None:
            continue
        for f in data_files(path):
            stat = f.stat()
            out.append([str(f.resolve()), stat.st_size, stat.st_mtime_ns])
    return out


def load_documents(path: str | Path, cache_dir: Path) -> Any:
    """The documents of ``path`` as a ``datasets.Dataset``: a ``save_to_disk`` folder, or files that
    ``datasets.load_dataset`` reads (jsonl, json, parquet, csv, txt: one file one document)."""
    import datasets

    files = data_files(path)
    root = Path(path).expanduser()
    if root.is_dir() and all((root / m).is_file() for m in SAVED_MARKERS):
        loaded = datasets.load_from_disk(str(root))
        if isinstance(loaded, datasets.DatasetDict):
            raise ValueError(f"path={str(path)!r} is a DatasetDict ({', '.join(loaded)}); give one split's folder")
        return loaded
    kinds = {BUILDERS.get(f.suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        bad = sorted({f.suffix or f.name for f in files if BUILDERS.get(f.suffix.lower()) is None})
        raise ValueError(f"path={str(path)!r} must hold files of one kind ({', '.join(BUILDERS)}), found "
                         f"{', '.join(bad) or ', '.join(sorted(k for k in kinds if k))}")
    builder = kinds.pop()
    if all(f.stat().st_size == 0 for f in files):
        raise ValueError(f"path={str(path)!r} holds no documents (an empty dataset)")
    extra = {"sample_by": "document"} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                     cache_dir=str(cache_dir), **extra)
    except (datasets.exceptions.DatasetGenerationError, ValueError) as err:
        raise ValueError(f"path={str(path)!r} could not be read as {builder}: {err.__cause__ or err}") from None


def check_fields(dataset: Any, path: str | Path, text_field: str, messages_field: str | None) -> None:
    """One field of text (or of chat messages) exists in a non-empty dataset."""
    from datasets import Value

    if len(dataset) == 0:
        raise ValueError(f"path={str(path)!r} holds no documents (an empty dataset)")
    key, name = ("messages_field", messages_field) if messages_field else ("text_field", text_field)
    features = dataset.features
    if name not in features:
        raise ValueError(f"{key}={name!r} is not a field of path={str(path)!r}; its fields: {', '.join(features)}")
    feature = features[name]
    if messages_field:
        inner = getattr(feature, "feature", None)
        if not isinstance(inner, dict) or not {"role", "content"} <= set(inner):
            raise ValueError(f"messages_field={name!r} of path={str(path)!r} is {feature}, not a list of "
                             "{'role', 'content'} messages")
    elif not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(f"text_field={name!r} of path={str(path)!r} holds {feature}, not text; its fields: "
                         f"{', '.join(f'{k} ({v})' for k, v in features.items())}")


def load_tokenizer(tokenizer: str | None, messages_field: str | None) -> Any:
    """``AutoTokenizer.from_pretrained`` of a local folder that has an EOS token (and, for chat, a template)."""
    from transformers import AutoTokenizer

    if not tokenizer:
        raise ValueError("tokenizer is not set: give data.tokenizer=FOLDER (or model.pretrained=FOLDER, its default)")
    if not Path(tokenizer).expanduser().is_dir():
        raise ValueError(f"tokenizer={tokenizer!r} is not a folder (a local AutoTokenizer.from_pretrained folder)")
    try:
        loaded = AutoTokenizer.from_pretrained(str(Path(tokenizer).expanduser()), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"tokenizer={tokenizer!r} could not be loaded: {str(err).splitlines()[0]}") from None
    if loaded.eos_token_id is None:
        raise ValueError(f"tokenizer={tokenizer!r} has no EOS token (eos_token), which ends every document; "
                         "set eos_token in its tokenizer_config.json")
    if messages_field and not loaded.chat_template:
        raise ValueError(f"tokenizer={tokenizer!r} has no chat template, which messages_field={messages_field!r} "
                         "needs; set chat_template in its tokenizer_config.json")
    return loaded


def tokenizer_hash(tokenizer: Any) -> str:
    """A digest of everything that decides the token ids: the vocabulary and rules, special tokens, template."""
    state = {"backend": tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else repr(tokenizer.get_vocab()),
             "special": tokenizer.special_tokens_map, "template": tokenizer.chat_template,
             "class": type(tokenizer).__name__}
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()
