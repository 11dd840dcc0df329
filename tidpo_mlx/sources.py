"""Where preference rows come from: files, folders, ``datasets.save_to_disk`` folders and the Hub.

``--data`` follows mlx-lm: a path (a folder of ``train``/``valid``/``test``
files or one file), else a bundled dataset name, else a Hugging Face Hub
dataset id (``org/name``, fetched with ``huggingface_hub.snapshot_download``,
which also works offline from the hub cache). Files are ``.jsonl``,
``.jsonl.gz``, ``.json`` (an array of objects, or JSON lines) and
``.parquet``. Every row comes with its ``where``: ``file:line`` for JSON (our
own reader) and ``source:split:row N`` for parquet and Arrow data.

Nothing here looks inside a row beyond "is it a JSON object": formats are
``data/formats.py``'s job. Problems that belong to one row (malformed JSON, invalid
UTF-8 on a line) are returned as :class:`Problem` s so that loading can
report all of them at once; problems with a whole file raise ``DataError``.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import yaml

from tidpo_mlx.errors import DataError, first_line

Row = tuple[str, dict[str, Any]]
"""A row with its ``where`` (``file:line`` or ``source:split:row N``)."""

SPLITS = ("train", "valid", "test")
SPLIT_ALIASES = {"train": ("train",), "valid": ("valid", "validation", "val", "dev"), "test": ("test",)}
"""File-name stems taken as each split (``validation`` is ``valid``, as in mlx-lm)."""
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class Problem:
    """One invalid row: where it is and why (the reason is what reports count by)."""

    where: str
    reason: str


def position(where: str) -> tuple[str, int]:
    """Sort key of a ``where`` in file order (``file:12``, ``name:split:row 3``)."""
    head, _, tail = where.rpartition(":")
    digits = "".join(c for c in tail if c.isdigit())
    return (head, int(digits)) if digits else (where, 0)


@dataclass
class SplitRows:
    """The rows of one split, and the rows that could not be read as JSON objects."""

    rows: list[Row] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def extend(self, other: "SplitRows") -> None:
        self.rows += other.rows
        self.problems += other.problems


@dataclass
class Source:
    """What ``--data`` named: its rows by split (``valid`` may be absent) and how it was found."""

    name: str
    splits: dict[str, SplitRows]
    kind: str
    """``folder``, ``file``, ``save_to_disk``, ``hub`` or ``bundled``."""


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), path.suffix.lower())


def _file_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when the name ends in ``.gz``; gzip content under another name is an error."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    if path.name.lower().endswith(".gz"):
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DataError(f"{path}: not valid gzip data ({err})") from None
    if raw.startswith(GZIP_MAGIC):
        raise DataError(f"{path}: this is gzip-compressed data; name the file *.gz (e.g. {path.name}.gz) to read it")
    return raw


def _lines(path: Path, raw: bytes) -> Iterator[tuple[str, bytes]]:
    """``(where, bytes)`` of each non-blank line; a UTF-8 byte-order mark is dropped."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        if line.strip():
            yield f"{path}:{lineno}", line


def _parse_line(where: str, line: bytes) -> dict[str, Any] | Problem:
    if b"\0" in line:
        return Problem(where, "binary data (NUL bytes), not JSON text")
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return Problem(where, "not valid UTF-8 text")
    except json.JSONDecodeError as err:
        return Problem(where, f"malformed JSON ({err.msg})")
    if not isinstance(row, dict):
        return Problem(where, "each line must be a JSON object")
    return row


def _json_array(path: Path, text: str) -> SplitRows:
    """The objects of a JSON array, each with the ``file:line`` where it starts."""
    decoder = json.JSONDecoder()
    out = SplitRows()
    pos = text.index("[") + 1
    line, counted = 1, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        line += text.count("\n", counted, pos)
        counted = pos
        where = f"{path}:{line}"
        try:
            row, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: malformed JSON array ({err.msg})") from None
        if isinstance(row, dict):
            out.rows.append((where, row))
        else:
            out.problems.append(Problem(where, "each array element must be a JSON object"))
    return out


def read_json_file(path: Path) -> SplitRows:
    """Rows of a ``.jsonl`` / ``.json`` file (gzipped when named ``*.gz``): JSON lines or one JSON array."""
    raw = _file_bytes(path)
    out = SplitRows()
    head = raw.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if head == b"[":
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            line = raw[: err.start].count(b"\n") + 1
            raise DataError(f"{path}:{line}: not valid UTF-8 text") from None
        out = _json_array(path, text)
    else:
        for where, line in _lines(path, raw):
            parsed = _parse_line(where, line)
            if isinstance(parsed, Problem):
                out.problems.append(parsed)
            else:
                out.rows.append((where, parsed))
    if not out.rows and not out.problems:
        raise DataError(f"{path}: no pairs")
    return out


def read_jsonl(path: Path) -> list[Row]:
    """Rows of a JSONL file, each with its ``file:line``; the first unreadable row raises ``DataError``."""
    read = read_json_file(Path(path))
    if read.problems:
        first = read.problems[0]
        raise DataError(f"{first.where}: {first.reason}")
    return read.rows


def _arrow_rows(name: str, split: str, table: Any) -> SplitRows:
    """Rows of a ``datasets.Dataset`` (or anything iterable of dicts) as ``name:split:row N``."""
    return SplitRows([(f"{name}:{split}:row {i}", dict(row)) for i, row in enumerate(table)])


def read_parquet(paths: list[Path], name: str, split: str) -> SplitRows:
    """Rows of parquet files read with ``datasets``' parquet builder."""
    datasets = _datasets()
    try:
        table = datasets.load_dataset("parquet", data_files=[str(p) for p in paths], split="train")
    except Exception as err:  # pyarrow and datasets raise many kinds for a bad file
        raise DataError(f"{paths[0]}: cannot read parquet ({type(err).__name__}: {err})") from None
    return _arrow_rows(name, split, table)


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("reading parquet, save_to_disk or Hub data needs the 'datasets' package: "
                        "pip install datasets") from None
    datasets.disable_progress_bars()
    return datasets


def read_file(path: Path, split: str) -> SplitRows:
    """Rows of one data file, by its suffix."""
    suffix = _suffix(path)
    if suffix == ".parquet":
        return read_parquet([path], str(path), split)
    if suffix in (".jsonl", ".jsonl.gz", ".json", ".json.gz"):
        return read_json_file(path)
    raise DataError(f"{path}: unknown data file type (expected {', '.join(SUFFIXES)})")


def split_of(relative: str) -> str | None:
    """The split a data file belongs to from its path (``data/train-00000-of-00001.parquet`` -> train)."""
    return next((split for split, aliases in SPLIT_ALIASES.items() if any(_named(relative, a) for a in aliases)), None)


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and _suffix(p) in SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def read_folder(folder: Path, name: str) -> dict[str, SplitRows]:
    """Rows by split of the data files in ``folder``, assigned by name (``train*``, ``valid*``/``validation*``, ``test*``)."""
    by_split: dict[str, list[Path]] = {}
    for path in _data_files(folder):
        split = split_of(str(path.relative_to(folder)))
        if split is not None:
            by_split.setdefault(split, []).append(path)
    return read_split_files(by_split, name)


def read_split_files(by_split: dict[str, list[Path]], name: str) -> dict[str, SplitRows]:
    """Rows by split of the given files (parquet through ``datasets``, JSON through our reader)."""
    if not by_split.get("train"):
        raise DataError(f"{name}: no train file (expected train.jsonl, train.jsonl.gz, train.json or "
                        "train.parquet; valid/validation and test are optional)")
    splits = {}
    for split, paths in by_split.items():
        rows = SplitRows()
        parquet = [p for p in paths if _suffix(p) == ".parquet"]
        if parquet:
            rows.extend(read_parquet(parquet, name, split))
        for path in paths:
            if path not in parquet:
                rows.extend(read_json_file(path))
        splits[split] = rows
    return splits


def read_save_to_disk(folder: Path) -> dict[str, SplitRows]:
    """Rows by split of a folder written by ``datasets``' ``save_to_disk`` (a DatasetDict or one Dataset)."""
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as err:
        raise DataError(f"{folder}: cannot read this save_to_disk folder ({type(err).__name__}: {err})") from None
    if isinstance(loaded, datasets.Dataset):
        return {"train": _arrow_rows(str(folder), "train", loaded)}
    splits = {}
    for key, table in loaded.items():
        split = split_of(key)
        if split is None:
            raise DataError(f"{folder}: split '{key}' is none of train, valid/validation, test")
        splits[split] = _arrow_rows(str(folder), key, table)
    if "train" not in splits:
        raise DataError(f"{folder}: no 'train' split (has {', '.join(loaded)})")
    return splits


def _slice(spec: str) -> tuple[str, slice]:
    """mlx-lm / datasets split syntax: ``train``, ``train[:1000]``, ``train[10:20]``."""
    m = re.fullmatch(r"\s*([\w.-]+)\s*(?:\[\s*(-?\d*)\s*:\s*(-?\d*)\s*\])?\s*", spec)
    if not m:
        raise DataError(f"hf_dataset: split {spec!r} is not NAME or NAME[a:b]")
    start, stop = (int(v) if v else None for v in m.group(2, 3))
    return m.group(1), slice(start, stop)


def readme_configs(folder: Path, repo_id: str) -> list[dict[str, Any]] | None:
    """The ``configs:`` list of a dataset card's YAML header (``README.md``), or None when it has none."""
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8-sig", errors="replace")
    m = re.match(r"---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", text, re.S)
    if not m:
        return None
    try:
        header = yaml.safe_load(m.group(1))
    except yaml.YAMLError as err:
        raise DataError(f"{repo_id}: README.md: the YAML header does not parse ({first_line(err)})") from None
    configs = header.get("configs") if isinstance(header, dict) else None
    if configs is None:
        return None
    if not isinstance(configs, list) or not all(isinstance(c, dict) and "config_name" in c for c in configs):
        raise DataError(f"{repo_id}: README.md: 'configs' must be a list of mappings with a config_name")
    return configs


def config_split_files(folder: Path, configs: list[dict[str, Any]], config: str | None, repo_id: str) -> dict[str, list[Path]]:
    """Files by the dataset's own split names for one entry of a card's ``configs:`` (as ``datasets`` reads it).

    The entry is ``config`` when given, else the one marked ``default: true``,
    else the one named ``default``, else the only one. ``data_files`` is a
    pattern or list of patterns (all ``train``) or a list of ``{split, path}``;
    patterns are globs relative to the repository (under ``data_dir`` if set).
    """
    names = [str(c["config_name"]) for c in configs]
    if config is not None:
        chosen = next((c for c in configs if str(c["config_name"]) == config), None)
        if chosen is None:
            raise DataError(f"{repo_id}: no config '{config}' in its README (has {', '.join(names)}; hf_dataset.config)")
    else:
        chosen = next((c for c in configs if c.get("default")), None) or next(
            (c for c in configs if c["config_name"] == "default"), None) or (configs[0] if len(configs) == 1 else None)
        if chosen is None:
            raise DataError(f"{repo_id}: its README defines configs {', '.join(names)}; choose one with hf_dataset.config")
    spec = chosen.get("data_files", [])
    if isinstance(spec, str) or (isinstance(spec, list) and all(isinstance(x, str) for x in spec)):
        spec = [{"split": "train", "path": spec}]
    if not isinstance(spec, list) or not all(isinstance(x, dict) and "path" in x for x in spec):
        raise DataError(f"{repo_id}: README config '{chosen['config_name']}': data_files must be patterns "
                        "or a list of {split, path}")
    base = folder / str(chosen.get("data_dir", ""))
    out: dict[str, list[Path]] = {}
    for entry in spec:
        split = str(entry.get("split", "train"))
        patterns = [entry["path"]] if isinstance(entry["path"], str) else list(entry["path"])
        files = sorted({p for pattern in patterns for p in base.glob(pattern) if p.is_file()})
        if not files:
            raise DataError(f"{repo_id}: README config '{chosen['config_name']}', split '{split}': no file matches "
                            f"{', '.join(patterns)}")
        out.setdefault(split, []).extend(files)
    return out


def read_hub(repo_id: str, config: str | None = None, split_names: dict[str, str | None] | None = None) -> dict[str, SplitRows]:
    """Rows by split of a Hub dataset, fetched with ``snapshot_download(repo_type="dataset")``.

    A dataset card whose YAML header has ``configs:`` is read as ``datasets``
    reads it (:func:`config_split_files`; ``config`` picks the entry). Without
    one, ``config`` picks the files under a folder of that name and files are
    assigned to splits by name (``validation`` is ``valid``). ``split_names``
    maps our splits to the dataset's (with optional ``[a:b]`` slices).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, repo_type="dataset",
                                        allow_patterns=[f"*{s}" for s in SUFFIXES] + ["README.md"]))
    except LocalEntryNotFoundError:
        raise DataError(f"{repo_id}: not in the Hugging Face cache and the Hub is not reachable "
                        "(HF_HUB_OFFLINE set or no network)") from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise DataError(f"{repo_id}: cannot fetch this Hub dataset ({type(err).__name__}: {first_line(err)})") from None
    named = {s: _slice(v) for s, v in (split_names or {}).items() if v}
    configs = readme_configs(folder, repo_id)
    if configs is not None:
        by_split = _split_files_by_card(config_split_files(folder, configs, config, repo_id), repo_id, named)
    else:
        by_split = _split_files_by_name(folder, repo_id, config, named)
    splits = read_split_files(by_split, repo_id)
    for split, (_, part) in named.items():
        if split in splits:
            splits[split].rows = splits[split].rows[part]
    return splits


def _split_files_by_card(by_name: dict[str, list[Path]], repo_id: str,
                         named: dict[str, tuple[str, slice]]) -> dict[str, list[Path]]:
    """Files by our split from the card's split names: a named split must exist, else the usual names."""
    by_split = {}
    for split in SPLITS:
        if split in named:
            name = named[split][0]
            if name not in by_name:
                raise DataError(f"{repo_id}: no split '{name}' (hf_dataset.{split}_split; it has {', '.join(by_name)})")
            by_split[split] = by_name[name]
        else:
            found = next((n for n in by_name if n.lower() in SPLIT_ALIASES[split]), None)
            if found is not None:
                by_split[split] = by_name[found]
    if "train" not in by_split:
        raise DataError(f"{repo_id}: its README's splits are {', '.join(by_name)}; name the one to train on "
                        "with hf_dataset.train_split (and valid_split)")
    return by_split


def _split_files_by_name(folder: Path, repo_id: str, config: str | None,
                         named: dict[str, tuple[str, slice]]) -> dict[str, list[Path]]:
    """Files by our split, from their paths (no ``configs:`` in the card): a named split's files first."""
    files = _data_files(folder)
    if config:
        files = [p for p in files if config in p.relative_to(folder).parts[:-1]]
        if not files:
            raise DataError(f"{repo_id}: no data files under a folder named '{config}' (hf_dataset.config)")
    by_split: dict[str, list[Path]] = {}
    for path in files:
        rel = str(path.relative_to(folder))
        split = next((s for s, (n, _) in named.items() if _named(rel, n)), None)
        if split is None:
            split = split_of(rel)
            if split in named:
                continue
        if split is not None:
            by_split.setdefault(split, []).append(path)
    return by_split


def _named(relative: str, name: str) -> bool:
    """Whether a file's path names the split ``name`` (a folder or a file stem ``name``, ``name-0000`` ...)."""
    return any(re.fullmatch(rf"{re.escape(name.lower())}([-_].*)?", part.split(".")[0])
               for part in re.split(r"[/\\]", relative.lower()))


def is_save_to_disk(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def bundled_folder(name: str) -> Path | None:
    """The folder of a bundled dataset (``arith``), if ``name`` is one."""
    if "/" in name or name.startswith((".", "~")):
        return None
    folder = Path(str(resources.files("tidpo_mlx.datasets") / name))
    return folder if folder.is_dir() else None


def is_hub_id(spec: str) -> bool:
    """``org/name`` that is not a path (no leading ``.``, ``/``, ``~``, one slash)."""
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and all(spec.split("/"))


def resolve_source(data: str, hf_dataset: dict[str, Any] | None = None) -> Source:
    """Find ``data``: a path, then a bundled name, then a Hub id (``hf_dataset`` wins when it has a path)."""
    if hf_dataset and hf_dataset.get("path"):
        repo = hf_dataset["path"]
        names = {s: hf_dataset.get(f"{s}_split") for s in SPLITS}
        return Source(repo, read_hub(repo, hf_dataset.get("config"), names), "hub")
    path = Path(data).expanduser()
    if path.is_dir():
        if is_save_to_disk(path):
            return Source(str(path), read_save_to_disk(path), "save_to_disk")
        return Source(str(path), read_folder(path, str(path)), "folder")
    if path.is_file():
        return Source(str(path), {"train": read_file(path, "train")}, "file")
    bundled = bundled_folder(data)
    if bundled is not None:
        return Source(str(bundled), read_folder(bundled, str(bundled)), "bundled")
    if is_hub_id(data) and not path.suffix:
        return Source(data, read_hub(data), "hub")
    raise DataError(f"{data}: no such data file or folder, bundled dataset or Hub dataset id (org/name)")
