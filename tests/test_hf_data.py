"""``data=hf``: documents packed whole (bfd) or cut in order (greedy), every token once, no label or attention
across documents (the ring's logits equal each document run alone), labels only on the assistant's turns,
a cache that a re-run reads without tokenizing, and one-line errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ring_plugin.data import hf_text
from ring_plugin.data.hf_packing import pack
from ring_plugin.data.hf_text import HFTextDataModule
from ring_plugin.testing.spawn import run_in_process_group

from .hf_data_fixtures import CHAT_TEMPLATE, chats, documents, train_tokenizer, write_jsonl

SEQ = 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_data")
    docs = documents(60, seed=3, max_words=40)
    return {"root": root, "docs": docs, "tokenizer": train_tokenizer(root / "tok", chat=True),
            "jsonl": write_jsonl(root / "docs.jsonl", [{"text": d, "n": i} for i, d in enumerate(docs)]),
            "chats": chats(30, seed=5)}


def _module(corpus, **kwargs) -> HFTextDataModule:
    args = {"path": str(corpus["jsonl"]), "tokenizer": str(corpus["tokenizer"]), "seq_len": SEQ, "num_proc": 1,
            "cache_dir": str(corpus["root"] / "cache"), "val_fraction": 0.0}
    return HFTextDataModule(**{**args, **kwargs})


def _pieces_cover_every_token_once(lengths: np.ndarray, pieces: np.ndarray, bounds: np.ndarray) -> None:
    covered = [np.zeros(n, dtype=int) for n in lengths]
    for doc, start, length in pieces.tolist():
        covered[doc][start:start + length] += 1
    assert all((c == 1).all() for c in covered)
    assert (np.diff(bounds) > 0).all()
    assert max(pieces[bounds[i]:bounds[i + 1], 2].sum() for i in range(len(bounds) - 1)) <= SEQ


def test_bfd_keeps_every_fitting_document_whole_and_cuts_long_ones_into_seq_len_pieces():
    lengths = np.random.default_rng(0).integers(1, 3 * SEQ, size=300)
    pieces, bounds = pack(lengths, SEQ, "bfd", seed=0)
    _pieces_cover_every_token_once(lengths, pieces, bounds)
    for doc, n in enumerate(lengths.tolist()):
        mine = pieces[pieces[:, 0] == doc]
        if n <= SEQ:
            assert mine.tolist() == [[doc, 0, n]]  # one piece: never split
        else:
            assert sorted(mine[:, 1].tolist()) == list(range(0, n, SEQ)) and (mine[:, 2] <= SEQ).all()
    # Best fit: no two samples could be merged into one (bfd leaves no two half-empty samples).
    fill = np.sort(np.add.reduceat(pieces[:, 2], bounds[:-1]))
    assert fill[0] + fill[1] > SEQ
    assert pack(lengths, SEQ, "bfd", seed=0)[0].tolist() == pieces.tolist()  # deterministic


def test_greedy_cuts_the_documents_in_order_without_padding():
    lengths = np.random.default_rng(1).integers(1, 2 * SEQ, size=100)
    pieces, bounds = pack(lengths, SEQ, "greedy", seed=0)
    _pieces_cover_every_token_once(lengths, pieces, bounds)
    fill = np.add.reduceat(pieces[:, 2], bounds[:-1])
    assert (fill == SEQ).sum() == len(fill) - (lengths.sum() % SEQ != 0)


def test_samples_hold_the_documents_with_eos_and_no_label_across_them(corpus):
    module = _module(corpus)
    tok = module.tokenizer
    expected = [tok(d)["input_ids"] + [tok.eos_token_id] for d in corpus["docs"]]
    seen = []
    for i in range(len(module.train_set)):
        sample = module.train_set[i]
        ids, labels, pos, docs = (sample[k] for k in ("input_ids", "labels", "position_ids", "document_ids"))
        at = 0
        for d, (doc, start, length) in enumerate(module.train_set.pieces_of(i).tolist()):
            want = expected[doc][start:start + length]
            assert ids[at:at + length].tolist() == want
            assert pos[at:at + length].tolist() == list(range(length)) and (docs[at:at + length] == d).all()
            assert labels[at:at + length - 1].tolist() == want[1:] and labels[at + length - 1] == -100
            seen.append((doc, start, length))
            at += length
        assert (labels[at:] == -100).all() and (docs[at:] == docs[at - 1] + 1).all()  # padding: its own document
    # Every document once: whole, or (longer than SEQ) in pieces of SEQ.
    assert sorted(seen) == [(d, s, min(SEQ, len(e) - s)) for d, e in enumerate(expected) for s in range(0, len(e), SEQ)]


def _ring_logits_error(rank: int, world: int, sample: dict, pieces: list) -> dict[str, float]:
    """Per layout: this rank's logits of the packed sample on the ring against each document run alone."""
    import torch.distributed as dist

    import ring_plugin.hf as hf
    from ring_plugin.comm.context import ring_context
    from ring_plugin.layout import shard_sequence

    from .hf_harness import rel_err, tiny_model

    batch = {k: v[None] for k, v in sample.items() if k != "labels"}
    alone, at = [], 0
    eager = tiny_model("llama", "eager", vocab_size=300)
    for _, _, length in pieces:
        alone.append(eager(input_ids=batch["input_ids"][:, at:at + length], use_cache=False).logits)
        at += length
    if at < batch["input_ids"].shape[1]:  # the padding: a document of its own
        alone.append(eager(input_ids=batch["input_ids"][:, at:], use_cache=False).logits)
    ring = tiny_model("llama", "ring", vocab_size=300)
    errors = {}
    for layout in ("zigzag", "balanced"):
        with ring_context(dist.group.WORLD, layout), torch.no_grad():
            out = ring(**hf.shard_batch(batch), use_cache=False).logits
        errors[layout] = rel_err(out, shard_sequence(torch.cat(alone, 1), 1, layout, rank, world,
                                                     batch["document_ids"]))
    return errors


def test_packed_sample_on_the_ring_equals_each_document_run_alone(corpus):
    module = _module(corpus)
    index = max(range(len(module.train_set)), key=lambda i: len(module.train_set.pieces_of(i)))
    pieces = module.train_set.pieces_of(index).tolist()
    assert len(pieces) >= 3
    errors = run_in_process_group(_ring_logits_error, 2, module.train_set[index], pieces, timeout=120)
    assert max(e for rank in errors for e in rank.values()) < 1e-5, errors


def test_a_rerun_reads_the_cache_and_tokenizes_nothing(corpus, monkeypatch):
    first = _module(corpus, packing="greedy", seq_len=48)
    assert first.cache_path.is_dir()

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(hf_text, "_tokenize_batch", refuse)
    monkeypatch.setattr(hf_text, "load_documents", refuse)
    again = _module(corpus, packing="greedy", seq_len=48)
    assert not again.tokenized_now and again.cache_path == first.cache_path
    assert all(torch.equal(a, b) for i in range(len(first.train_set))
               for a, b in zip(first.train_set[i].values(), again.train_set[i].values()))
    with pytest.raises(AssertionError, match="tokenized again"):  # another seq_len is another key
        _module(corpus, packing="greedy", seq_len=32)


def test_chat_labels_only_the_assistant_tokens(corpus):
    path = write_jsonl(corpus["root"] / "chats.jsonl", [{"messages": c} for c in corpus["chats"]])
    module = _module(corpus, path=str(path), messages_field="messages", seq_len=256)  # every chat fits whole
    tok = module.tokenizer
    assert tok.chat_template == CHAT_TEMPLATE
    for i in range(len(module.train_set)):
        sample = module.train_set[i]
        at = 0
        for doc, start, length in module.train_set.pieces_of(i).tolist():
            assert start == 0
            targets = sample["labels"][at:at + length - 1]
            scored = targets[targets != -100].tolist()
            assistant = [m["content"] for m in corpus["chats"][doc] if m["role"] == "assistant"]
            assert tok.decode(scored) == "".join(a + "<|eos|>" for a in assistant)
            at += length


@pytest.mark.parametrize("case, message", [
    ("missing_field", "text_field='body' is not a field of path="),
    ("not_text", "text_field='n' of path="),
    ("empty", "holds no documents (an empty dataset)"),
    ("no_eos", "has no EOS token"),
    ("no_path", "does not exist"),
    ("seq_len", "seq_len=100000 is more than the"),
])
def test_bad_input_is_a_one_line_error_naming_it(corpus, tmp_path, case, message):
    kwargs: dict = {"cache_dir": str(tmp_path / "cache")}
    if case == "missing_field":
        kwargs["text_field"] = "body"
    elif case == "not_text":
        kwargs["text_field"] = "n"
    elif case == "empty":
        kwargs["path"] = str(write_jsonl(tmp_path / "empty.jsonl", []))
    elif case == "no_eos":
        kwargs["tokenizer"] = str(train_tokenizer(tmp_path / "tok", eos=False))
    elif case == "no_path":
        kwargs["path"] = str(tmp_path / "missing.jsonl")
    else:
        kwargs["seq_len"] = 100000
    with pytest.raises(ValueError) as err:
        _module(corpus, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
    if case == "missing_field":
        assert str(err.value).endswith("its fields: text, n")
