"""Packed documents, in one package: several documents back to back in one sequence, attending within each.

- :mod:`.ids`: ``document_ids`` from HF-style ``position_ids``, their check, the work of the document mask,
  and the seeded document lengths of the ``data=packed`` task;
- :mod:`.balance`: the ``balanced`` layout, equal chunks dealt so every rank does the same work;
- :mod:`.blocks`: every rank's ids in the ring and the blocks they leave to compute (planned once per step).

The mask itself (the oracle's ``allowed[i, j] = doc[i] == doc[j]``) is ``attention.oracle.document_mask``;
the kernels that apply it are ``ops.document_kernels``. Batches carry their ids in the shard plan
(:mod:`ring_plugin.shard_plan`).
"""

from .ids import document_ids_error, document_ids_from_position_ids, mask_work, packed_document_lengths

__all__ = ["document_ids_error", "document_ids_from_position_ids", "mask_work", "packed_document_lengths"]
