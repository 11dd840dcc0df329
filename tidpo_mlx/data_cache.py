"""The encoded-dataset cache: encoding ``--data`` once per (data, tokenizer, encoding settings).

An entry is ``<cache>/encoded/<key>.bin`` (``<cache>`` is
``$XDG_CACHE_HOME/tidpo-mlx``, default ``~/.cache/tidpo-mlx``), written
atomically. The key is the sha256 of

- the bytes of every file that ``--data`` can read (one file, every data file
  under a folder, or the Hub snapshot's files), with their paths (the
  ``file:line`` of every pair is kept);
- the tokenizer: its ``tokenizer.json`` serialisation (or vocabulary), chat
  template and EOS id;
- the config keys that change encoding: ``chat_template`` (with the file's
  text when it is a path), ``max_length``, ``max_prompt_length``,
  ``hf_dataset``; and :data:`FORMAT`.

An entry keeps every invalid row as a problem: ``skip_invalid`` is decided
after it is read, so a run that stopped on invalid rows and its rerun with
``--skip-invalid`` encode once.

The entry holds the encoded splits before a held-out split is made, so
``valid_fraction`` and ``seed`` are not part of the key. It stores every
token id in one int32 array with offsets, the rest of each Example as JSON,
and a sha256 of both, behind a header of their lengths (read in one call,
viewed without copying): an entry that does not load or whose digest differs is
ignored with a note and rewritten. ``TIDPO_MLX_NO_ENCODE_CACHE=1`` turns the
cache off.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from tidpo_mlx.config import Config
from tidpo_mlx import files
from tidpo_mlx.files import atomic_write
from tidpo_mlx.sources import SUFFIXES, Problem, bundled_folder, is_hub_id

FORMAT = 3
"""Version of the entry layout and of the encoding rules: bump when either changes."""
DISABLE = "TIDPO_MLX_NO_ENCODE_CACHE"
CHUNK = 1 << 20
DATA_SUFFIXES = SUFFIXES + (".arrow",)
"""Files a folder's key hashes (``save_to_disk`` folders: Arrow files and their JSON state)."""


@dataclass
class Encoded:
    """What encoding a source gives before the held-out split: examples and invalid rows by split, notes."""

    splits: dict[str, list[Any]]
    problems: dict[str, list[Problem]]
    """Every invalid row, by split, in file order (whether to stop or skip them is decided after the cache:
    ``data.splits.invalid_rows``); a split's rows read are its examples and its problems."""
    notes: list[str]
    name: str
    kind: str


def cache_root() -> Path:
    """The encoded datasets' folder: ``encoded/`` in tidpo-mlx's cache (``files.cache_root``)."""
    return files.cache_root() / "encoded"


def enabled() -> bool:
    """Whether the cache is on (``TIDPO_MLX_NO_ENCODE_CACHE`` unset or ``0``)."""
    return os.environ.get(DISABLE, "0") in ("", "0")


def _folder_files(folder: Path) -> list[Path]:
    """Every non-hidden data file under ``folder`` (JSON, parquet, Arrow): a superset of what loading reads."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(DATA_SUFFIXES)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _hub_folder(repo_id: str) -> Path | None:
    """The local snapshot of a Hub dataset as ``sources.read_hub`` fetches it (None when unavailable)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset",
                                      allow_patterns=[f"*{s}" for s in SUFFIXES] + ["README.md"]))
    except Exception:  # loading reports the reason itself; no key means no cache
        return None


def data_files(data: str, hf_dataset: dict[str, Any] | None) -> list[Path] | None:
    """The files ``sources.resolve_source`` may read for ``data`` (None: none found, loading reports it)."""
    if hf_dataset and hf_dataset.get("path"):
        folder = _hub_folder(hf_dataset["path"])
        return None if folder is None else _folder_files(folder)
    path = Path(data).expanduser()
    if path.is_dir():
        return _folder_files(path)
    if path.is_file():
        return [path]
    bundled = bundled_folder(data)
    if bundled is not None:
        return _folder_files(bundled)
    if is_hub_id(data) and not path.suffix:
        folder = _hub_folder(data)
        return None if folder is None else _folder_files(folder)
    return None


def tokenizer_identity(tokenizer: Any) -> str:
    """sha256 of what decides the tokenizer's ids: its serialisation (or vocabulary), chat template, EOS id."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    backend = getattr(hf, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(hf.get_vocab().items()))
    extra = json.dumps([type(hf).__name__, getattr(hf, "chat_template", None), tokenizer.eos_token_id])
    return hashlib.sha256(body.encode() + b"\0" + extra.encode()).hexdigest()


def _template_text(cfg: Config) -> str:
    if cfg.chat_template in ("auto", "none"):
        return cfg.chat_template
    try:
        return Path(cfg.chat_template).expanduser().read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return cfg.chat_template  # the encoder reports an unreadable template before anything is stored


def cache_key(data: str, tokenizer: Any, cfg: Config, hf_dataset: dict[str, Any] | None) -> str | None:
    """The entry's key (see the module docstring), or None when the cache is off or ``data`` is not found."""
    if not enabled():
        return None
    files = data_files(data, hf_dataset)
    if files is None:
        return None
    digest = hashlib.sha256()
    settings = {"format": FORMAT, "data": data, "template": _template_text(cfg), "max_length": cfg.max_length,
                "max_prompt_length": cfg.max_prompt_length, "hf_dataset": hf_dataset, "tokenizer": tokenizer_identity(tokenizer)}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in files:
        digest.update(b"\0file\0" + str(path.resolve()).encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(CHUNK):
                digest.update(block)
    return digest.hexdigest()


def entry_path(key: str) -> Path:
    return cache_root() / f"{key}.bin"


MAGIC = b"TIDPOENC"
"""First bytes of an entry; then four little-endian uint64 lengths (ids, offsets, meta, digest) and the parts."""


def _payload_digest(ids: bytes, offsets: bytes, meta: bytes) -> str:
    h = hashlib.sha256()
    for part in (ids, offsets, meta):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def store(key: str, encoded: Encoded) -> Path:
    """Write the entry for ``key`` atomically; returns its path."""
    sequences: list[list[int]] = []
    splits = {}
    for split, examples in encoded.splits.items():
        rows = []
        for ex in examples:
            sequences += [ex.prompt, ex.chosen, ex.rejected] + ([ex.anchor] if ex.anchor is not None else [])
            rows.append([ex.index, ex.source, ex.messages, ex.prompt_truncated, ex.responses_truncated,
                         ex.texts, ex.dropped_turns, ex.anchor is not None])
        splits[split] = rows
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype("<i8").tobytes()
    ids = np.fromiter(itertools.chain.from_iterable(sequences), dtype="<i4", count=int(lengths.sum())).tobytes()
    problems = {split: [[p.where, p.reason] for p in found] for split, found in encoded.problems.items()}
    meta = json.dumps({"format": FORMAT, "splits": splits, "problems": problems,
                       "notes": encoded.notes, "name": encoded.name, "kind": encoded.kind},
                      ensure_ascii=False, separators=(",", ":")).encode()
    digest = _payload_digest(ids, offsets, meta).encode()
    path = entry_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(MAGIC + b"".join(len(part).to_bytes(8, "little") for part in (ids, offsets, meta, digest)))
            for part in (ids, offsets, meta, digest):
                f.write(part)

    atomic_write(path, write)
    return path


class CorruptEntry(Exception):
    """An entry that does not load or does not match its digest (never trusted)."""


def _parts(raw: bytes) -> tuple[memoryview, memoryview, bytes]:
    """The ids, offsets and meta of an entry's bytes, its digest checked."""
    head = len(MAGIC) + 4 * 8
    if len(raw) < head or not raw.startswith(MAGIC):
        raise CorruptEntry("not an encoded-dataset entry (bad header)")
    sizes = [int.from_bytes(raw[len(MAGIC) + 8 * i: len(MAGIC) + 8 * i + 8], "little") for i in range(4)]
    if head + sum(sizes) != len(raw):
        raise CorruptEntry(f"{len(raw)} bytes where the header says {head + sum(sizes)}")
    view = memoryview(raw)
    bounds = np.cumsum([head] + sizes).tolist()
    ids, offsets, meta, digest = (view[a:b] for a, b in zip(bounds, bounds[1:]))
    if bytes(digest).decode("ascii", "replace") != _payload_digest(ids, offsets, meta):
        raise CorruptEntry("its digest does not match its content")
    return ids, offsets, bytes(meta)


def _read(path: Path, example: Callable[..., Any]) -> Encoded:
    try:
        ids, offsets, meta = _parts(path.read_bytes())
        info = json.loads(meta)
    except CorruptEntry:
        raise
    except Exception as err:  # unreadable or garbled content raises many kinds
        raise CorruptEntry(f"{type(err).__name__}: {err}") from None
    if info.get("format") != FORMAT:
        raise CorruptEntry(f"format {info.get('format')} is not {FORMAT}")
    flat = np.frombuffer(ids, dtype="<i4").tolist()
    bounds = np.frombuffer(offsets, dtype="<i8").tolist()
    sequences = iter([flat[a:b] for a, b in zip(bounds, bounds[1:])])
    splits: dict[str, list[Any]] = {}
    try:
        for split, rows in info["splits"].items():
            splits[split] = [
                example(index=index, source=source, messages=messages, prompt=next(sequences),
                        chosen=next(sequences), rejected=next(sequences),
                        anchor=next(sequences) if has_anchor else None, prompt_truncated=prompt_cut,
                        responses_truncated=cuts, texts=texts, dropped_turns=dropped)
                for index, source, messages, prompt_cut, cuts, texts, dropped, has_anchor in rows]
        problems = {split: [Problem(where, reason) for where, reason in found]
                    for split, found in info["problems"].items()}
    except (ValueError, TypeError, KeyError, AttributeError, StopIteration) as err:
        raise CorruptEntry(f"malformed content ({type(err).__name__}: {err})") from None
    if next(sequences, None) is not None:
        raise CorruptEntry("token sequences left over")
    return Encoded(splits, problems, list(info["notes"]), info["name"], info["kind"])


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Cyclic garbage collection paused while ~10^6 new objects are built (each allocation burst would run a
    full pass), and those objects then frozen (``gc.freeze``): later passes no longer walk a loaded dataset."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was:
            gc.enable()


def cached(key: str | None, encode: Callable[[], Encoded], example: Callable[..., Any]) -> Encoded:
    """The entry for ``key`` when it loads and checks out, else ``encode()`` (stored under ``key``).

    ``example`` builds one Example from its fields. A note says which happened;
    a corrupt or stale entry is named in a note and rewritten.
    """
    if key is None:
        return encode()
    path = entry_path(key)
    problem = None
    if path.is_file():
        try:
            with _no_gc():
                hit = _read(path, example)
            hit.notes = hit.notes + [f"encoded dataset read from the cache ({path}; "
                                     f"{DISABLE}=1 re-encodes without it)"]
            return hit
        except CorruptEntry as err:
            problem = f"ignored the corrupt encoded-dataset cache entry {path} ({err}); re-encoded and rewrote it"
    with _no_gc():
        fresh = encode()
        written = store(key, fresh)
    fresh.notes = fresh.notes + ([problem] if problem else []) + [f"encoded dataset cached in {written}"]
    return fresh
