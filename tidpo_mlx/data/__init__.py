"""Preference pairs, from rows to encoded splits (batches: ``batching.py``; where rows come from: ``sources.py``).

One job per module:

- ``example``: :class:`Example` (one encoded pair), :class:`Dataset`, the prompt key;
- ``formats``: rows in TRL's forms (and HH transcripts) parsed into messages;
- ``template``: the chat template, its probed roles, content spans and masks;
- ``tokens``: batched tokenisation with offsets read on demand;
- ``encoder``: :class:`PairEncoder`, pairs to token ids with truncation;
- ``workers``: chunks of rows, in worker processes for large data;
- ``splits``: invalid-row checks, the held-out split, the Dataset;
- ``load``: :func:`load_dataset` (training) and :func:`load_split` (``eval``,
  ``importance``, the audit), one cached path.

The names other modules use most are importable from ``tidpo_mlx.data`` itself.
"""

from tidpo_mlx.data.encoder import PairEncoder
from tidpo_mlx.data.example import Dataset, Example
from tidpo_mlx.data.formats import parse_row
from tidpo_mlx.data.load import Split, hf_dataset_keys, load_dataset, load_split

__all__ = ["Dataset", "Example", "PairEncoder", "Split", "hf_dataset_keys", "load_dataset", "load_split", "parse_row"]
