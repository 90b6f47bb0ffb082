"""Read any supported dataset into `(source, record)` pairs, then into `Conversation`s.

Inputs: JSONL (streamed line by line), JSON (an array; an object holding a list of records,
e.g. under "data", or one list per split; an object of equal-length columns; or one
record), CSV/TSV, Parquet (streamed by batches), a dataset saved with
`datasets.save_to_disk`, and a Hugging Face dataset id (from the local cache when offline).

Sources name where each record came from, so every error can point at it:
  JSONL, JSON arrays  `path:LINE` (the 1-based line where the record starts)
  CSV/TSV             `path:LINE` (the physical line where the record starts: a quoted
                      field with embedded newlines spans several lines; the header is line 1)
  JSON columns/lists, Parquet, HF datasets  `path:row N` (1-based record number)

Bad records: with `on_error="raise"` the first one raises a `DataError` naming file and
line; with `on_error="skip"` each one is written to a `RejectLog` (nothing dropped
silently: records in = kept + rejected). A file that cannot be parsed at all (an empty or
broken .json document, a UTF-16 file, a Parquet file without its footer) raises in both
modes. A file that breaks part-way (a JSON array cut off, an unbalanced CSV quote, corrupt
Parquet pages) keeps, in skip mode, the records read before the break and rejects the rest
of the file as one record, since no record boundary can be trusted after it.
JSON that Python parses but no model can take is rejected per record: nesting deeper than
the parser's recursion limit, and lone UTF-16 surrogates written as `\\udXXX` escapes.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import io
import json
import lzma
import re
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from sftlab.data.conversation import Conversation, jsonable
from sftlab.data.formats import Columns, RecordError, check_format_name, detect_format, to_conversation
from sftlab.data.oasst import conversations_from_trees, is_message_row
from sftlab.errors import DataError, SftlabError

ON_ERROR = ("raise", "skip")
BATCH_ROWS = 1024
# CSV columns that may hold JSON lists (message lists) rather than plain strings; the first two
# hold nothing else.
_MESSAGE_COLUMNS = {"messages", "conversations"}
_JSON_COLUMNS = {*_MESSAGE_COLUMNS, "chosen", "rejected", "prompt", "completion"}
_PANDAS_INDEX = "__index_level_"  # a DataFrame's index, as pandas writes it into Parquet and Arrow files
_HUB_ID = re.compile(r"^(hf://)?[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_WS = re.compile(r"\s*")
_CSV_FIELD_LIMIT = 2**31 - 1  # the csv module's default, 128 KiB, is shorter than many documents
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_WIDE_BOMS = {codecs.BOM_UTF32_LE: "UTF-32", codecs.BOM_UTF32_BE: "UTF-32", codecs.BOM_UTF16_LE: "UTF-16",
              codecs.BOM_UTF16_BE: "UTF-16"}  # UTF-32 first: its LE mark starts with UTF-16's


@dataclass
class _Bad:
    """A record that could not be read (kept apart from good ones so skip mode can log it)."""

    error: RecordError
    raw: Any


class RejectLog:
    """Bad records in skip mode: one JSON line each in `path` (if given), counted by kind."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self.counts: Counter[str] = Counter()
        self._fh = None
        self._mode = "w"  # the first open starts the file; a reopen after close() appends

    def add(self, source: str, reason: str, raw: Any, kind: str | None = None) -> None:
        self.counts[kind or reason] += 1
        if self.path is None:
            return
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, self._mode, encoding="utf-8")
            self._mode = "a"
        line = {"source": source, "kind": kind or reason, "reason": reason, "raw": raw}
        self._fh.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")

    def add_error(self, err: DataError, raw: Any) -> None:
        self.add(err.source, err.reason, raw, getattr(err, "kind", None))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict[str, int]:
        """Rejects by kind, most frequent first."""
        return dict(self.counts.most_common())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> RejectLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _utf8_error(source: str, byte: int, column: int) -> RecordError:
    return RecordError(source, "not UTF-8", f"invalid byte 0x{byte:02x} at column {column}; re-save the file as UTF-8")


class _ZstdFile(io.RawIOBase):
    """A .zst file's bytes, frame after frame. zstandard's own reader ends quietly where a file was cut
    short (records silently lost); here a frame left open at the end of the file is an EOFError."""

    CHUNK = 1 << 16

    def __init__(self, path: Path):
        super().__init__()
        self._file, self._frame, self._pending = open(path, "rb"), self._decompressor(), b""

    @staticmethod
    def _decompressor():
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            if self._frame.eof:  # the next frame, if any, begins with what the last one left unread
                data = self._frame.unused_data + self._file.read(self.CHUNK)
                if not data:
                    return 0
                self._frame = self._decompressor()
            elif not (data := self._file.read(self.CHUNK)):
                raise EOFError("the file ends inside a zstd frame (cut short?)")
            self._pending = self._frame.decompress(data)
        n = min(len(buffer), len(self._pending))
        buffer[:n], self._pending = self._pending[:n], self._pending[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def _zstd_open(path: Path, mode: str = "rb"):
    return io.BufferedReader(_ZstdFile(path))


# Compressed data files as hubs ship them (.jsonl.gz, .json.gz; .jsonl.zst for large text corpora): each
# suffix's opener, decompressing as it reads, and the name an error gives it.
COMPRESSED: dict[str, tuple[Callable, str]] = {".gz": (gzip.open, "gzip"), ".bz2": (bz2.open, "bzip2"),
                                               ".xz": (lzma.open, "xz"), ".zst": (_zstd_open, "zstd")}


def _open(path: Path):
    """A data file's bytes, decompressed as read where its suffix is in COMPRESSED."""
    opener, _ = COMPRESSED.get(path.suffix.lower(), (open, ""))
    return opener(path, "rb")


def _check_not_wide(path: Path) -> None:
    """A UTF-16/32 text file (Windows tools write them) would otherwise fail on every line."""
    with _open(path) as f:
        head = f.read(4)
    encoding = next((name for bom, name in _WIDE_BOMS.items() if head.startswith(bom)), None)
    if encoding:
        raise RecordError(f"{path}:1", "not UTF-8", f"the file is {encoding} (byte-order mark at the start); re-save it as UTF-8")


def _loads(text: str, source: str):
    """json.loads, with the problems it lets through or raises oddly turned into RecordErrors."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(source, "malformed JSON", f"{e.msg} (column {e.colno})") from None
    except (RecursionError, ValueError) as e:
        raise _unparsable(source, e) from None
    _check_unicode(obj, text, source)
    return obj


def _unparsable(source: str, e: Exception) -> RecordError:
    """JSON the parser gives up on without a JSONDecodeError: deep nesting (RecursionError) or an
    integer longer than Python's int-conversion limit (ValueError)."""
    detail = "nested too deeply to parse" if isinstance(e, RecursionError) else _first_line(e).split(":")[0]
    return RecordError(source, "malformed JSON", detail)


def _check_unicode(obj: Any, text: str, source: str) -> None:
    """JSON may escape half of a UTF-16 surrogate pair (`\\ud800`): Python keeps it as a lone
    surrogate, which no UTF-8 file, hash or tokenizer accepts. Only text holding such an escape
    is checked."""
    if not _SURROGATE_ESCAPE.search(text):
        return
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        lone = e.object[e.start]
        raise RecordError(source, "invalid unicode", f"lone surrogate \\u{ord(lone):04x} (half of a UTF-16 pair)") from None


def _rest_of_file(error: RecordError) -> _Bad:
    """The remainder of a file that broke part-way (from `error.source` on), rejected as one record."""
    return _Bad(error, f"<the rest of the file from {error.source}>")


# ---------------------------------------------------------------- readers: path -> (source, record | _Bad)

def _read_jsonl(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    with _open(path) as f:
        first = True
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if not raw.strip():
                continue
            if first and raw.strip() in (b"[", b"{", b"[{") and _one_document(path):  # each line a reject
                raise DataError(f"{path}:{lineno}", "this is one JSON document over several lines, not JSON Lines "
                                                    "(one record per line): name the file .json")
            first = False
            source = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield source, _Bad(_utf8_error(source, raw[e.start], e.start + 1), raw.decode("utf-8", "backslashreplace").rstrip("\r\n"))
                continue
            try:
                yield source, _loads(text, source)
            except RecordError as e:
                yield source, _Bad(e, text)


def _decode_file(path: Path) -> str:
    with _open(path) as f:
        data = f.read().removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise _utf8_error(f"{path}:{line}", data[e.start], column) from None


def _json_error(path: Path, e: json.JSONDecodeError) -> RecordError:
    return RecordError(f"{path}:{e.lineno}", "malformed JSON", f"{e.msg} (column {e.colno})")


def _json_array(path: Path, text: str, pos: int) -> Iterator[tuple[str, Any]]:
    """Elements of a top-level array, each with the line where it starts. Where the array breaks,
    the rest of the file is one bad record (the elements before it are whole)."""
    decoder = json.JSONDecoder()
    pos = _WS.match(text, pos + 1).end()
    line, counted = 1 + text.count("\n", 0, pos), pos
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            line, counted = line + text.count("\n", counted, pos), pos
            source = f"{path}:{line}"
            try:
                start = pos
                obj, pos = decoder.raw_decode(text, pos)
                _check_unicode(obj, text[start:pos], source)
            except json.JSONDecodeError as e:
                error = _json_error(path, e)
                yield error.source, _rest_of_file(error)
                return
            except RecordError as e:  # the element is whole: only it is bad
                yield source, _Bad(e, text[start:pos])
            except (RecursionError, ValueError) as e:
                yield source, _rest_of_file(_unparsable(source, e))
                return
            else:
                yield source, obj
            pos = _WS.match(text, pos).end()
            if text.startswith(",", pos):
                pos = _WS.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                error = _json_error(path, json.JSONDecodeError("expected ',' or ']' between records", text, pos))
                yield error.source, _rest_of_file(error)
                return
    if text[pos:].strip():
        error = _json_error(path, json.JSONDecodeError("extra data after the array", text, _WS.match(text, pos).end()))
        yield error.source, _rest_of_file(error)


# `split` for a source that must be told which of several splits to read: an eval set to decontaminate
# against, whose "train" split is not one (read a named split as PATH:SPLIT, `eval_source`).
NAMED_SPLIT = "\x00named"


def eval_source(spec: str) -> tuple[str, str]:
    """(path, split) of an eval source given as PATH or PATH:SPLIT (NAMED_SPLIT when none is named)."""
    path, sep, split = spec.rpartition(":")
    if sep and split and path and Path(path).exists() and not Path(spec).exists():
        return path, split
    return spec, NAMED_SPLIT


def _pick_split(available: list[str], split: str | None, where: str) -> str:
    """`split` if given; else the only one; else "train" (unless NAMED_SPLIT)."""
    if split == NAMED_SPLIT:
        if len(available) == 1:
            return available[0]
        raise SftlabError(f"{where} holds several splits ({', '.join(available)}): name the one to read as "
                          f"{where}:SPLIT")
    if split is not None:
        if split not in available:
            raise SftlabError(f"{where} has no split '{split}'; it has: {', '.join(available)}")
        return split
    if len(available) == 1:
        return available[0]
    if "train" in available:
        return "train"
    raise SftlabError(f"{where} holds several splits ({', '.join(available)}): choose one with --split")


def _json_object(path: Path, obj: dict, split: str | None) -> Iterator[tuple[str, Any]]:
    if (rows := _pandas_rows(obj)) is not None:
        for i, row in enumerate(rows, 1):
            yield f"{path}:row {i}", _present(row)
        return
    values = list(obj.values())
    if _is_pandas_columns(values):  # pandas' to_json() default: {"column": {"0": value, "1": value}}
        values = [list(v.values()) for v in values]
    # columns: {"instruction": [...], "output": [...]}, any of them may hold objects ({"meta": [{...}]},
    # SQuAD's answers), but not all of them: lists of records only are splits ({"train": [...], ...})
    columns = bool(values) and all(isinstance(v, list) for v in values)
    if columns and not (any(values) and all(isinstance(x, dict) for v in values for x in v)):
        lengths = {k: len(v) for k, v in zip(obj, values)}
        if len(set(lengths.values())) > 1:
            raise DataError(f"{path}:1", f"a JSON object of columns needs lists of equal length, got {lengths}")
        for i, row in enumerate(zip(*values), 1):
            yield f"{path}:row {i}", _present(dict(zip(obj.keys(), row)))
        return
    try:
        detect_format(obj)
        yield f"{path}:1", obj  # the file is one record
        return
    except RecordError:
        pass
    record_lists = [k for k, v in obj.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
    if not record_lists:
        raise DataError(f"{path}:1", "a JSON object must be one record, hold a list of records "
                                     "(e.g. under \"data\"), or hold columns (lists) of equal length")
    key = _pick_split(record_lists, split, str(path))
    for i, rec in enumerate(obj[key], 1):
        yield f"{path}:{key} row {i}", rec


def _pandas_rows(obj: dict) -> list[dict] | None:
    """The rows of a DataFrame written by pandas' `to_json(orient="split")` ({"columns", "index"?, "data"})
    or `orient="index"` ({"0": {row}, "1": {row}}); None for any other object."""
    if set(obj) - {"index"} == {"columns", "data"} and isinstance(obj["columns"], list) \
            and isinstance(obj["data"], list) and all(isinstance(r, list) and len(r) == len(obj["columns"])
                                                      for r in obj["data"]):
        return [dict(zip(obj["columns"], r)) for r in obj["data"]]
    if obj and all(k.isdigit() for k in obj) and all(isinstance(v, dict) for v in obj.values()):
        return list(obj.values())
    return None


def _is_pandas_columns(values: list) -> bool:
    """Every value an object keyed by the same row numbers ("0", "1", ...): a DataFrame written
    with pandas' default `to_json()` (orient="columns")."""
    if not values or not all(isinstance(v, dict) and v for v in values):
        return False
    keys = list(values[0])
    return all(list(v) == keys for v in values) and all(k.isdigit() for k in keys)


def _read_json(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    text = _decode_file(path)
    start = _WS.match(text).end()
    if text.startswith("[", start):
        yield from _json_array(path, text, start)
        return
    if not text[start:]:
        raise DataError(f"{path}:1", "empty file: expected a JSON array or object")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and _one_line_record(text[start:]):
            raise DataError(f"{path}:{e.lineno}", "this is JSON Lines (one record per line), not one JSON "
                                                  "document: name the file .jsonl") from None
        raise _json_error(path, e) from None
    except (RecursionError, ValueError) as e:
        raise _unparsable(f"{path}:1", e) from None
    _check_unicode(obj, text, f"{path}:1")
    if not isinstance(obj, dict):
        raise DataError(f"{path}:1", f"expected a JSON array or object, got {type(obj).__name__}")
    yield from _json_object(path, obj, split)


def _one_document(path: Path) -> bool:
    try:
        json.loads(_decode_file(path))
    except (ValueError, RecursionError, RecordError):
        return False
    return True


def _one_line_record(text: str) -> bool:
    try:
        return isinstance(json.loads(text.partition("\n")[0]), dict)
    except ValueError:
        return False


def _present(row: dict) -> dict:
    """A columnar row without its null cells: a null means the field is absent for this record
    (so a file mixing schemas still detects each record's own schema)."""
    return {k: v for k, v in row.items() if v is not None}


_MESSAGES_REPR = re.compile(r"\s*\[\s*\{\s*'(role|from|content|value)'\s*:")  # str() of a list of message dicts


def _csv_cell(column: str, value: str, source: str) -> Any:
    """Empty cells are absent values; JSON message lists in message columns are parsed. A column
    that may also hold plain text (prompt, completion, chosen, rejected) keeps a cell that is not
    a JSON list of objects as text: "[1, 2, 3]" or "[INST] ..." are answers and prompts too."""
    if value == "":
        return None
    if column in _JSON_COLUMNS and value.lstrip().startswith("["):
        try:
            parsed = _loads(value, source)
        except RecordError as e:
            messages_repr = _MESSAGES_REPR.match(value) is not None  # prompt/chosen/... columns of message lists
            if column not in _MESSAGE_COLUMNS and not messages_repr:
                return value
            repr_hint = " (single quotes: a Python repr, as pandas writes a column of lists; write the lists as JSON)" \
                if messages_repr or value.lstrip().startswith(("[{'", "['")) else ""
            raise RecordError(source, e.kind, f"in column '{column}': {e.reason.removeprefix(e.kind + ': ')}"
                                              f"{repr_hint}") from None
        if column in _MESSAGE_COLUMNS or (parsed and all(isinstance(m, dict) for m in parsed)):
            return parsed
    return value


def _read_csv(path: Path, split: str | None, delimiter: str = ",") -> Iterator[tuple[str, Any]]:
    bad_lines: dict[int, RecordError] = {}

    def lines() -> Iterator[str]:
        with _open(path) as f:
            for lineno, raw in enumerate(f, 1):
                if lineno == 1:
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    bad_lines[lineno] = _utf8_error(f"{path}:{lineno}", raw[e.start], e.start + 1)
                    yield raw.decode("utf-8", "backslashreplace")

    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))  # a long document is one field
    reader = csv.reader(lines(), delimiter=delimiter, strict=True)
    prev = 0
    header: list[str] | None = None
    while True:
        start = prev + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            error = RecordError(f"{path}:{start}", "malformed CSV", f"{e} (check quotes)")
            if header is None:
                raise error from None
            yield error.source, _rest_of_file(error)
            return
        prev = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        source = f"{path}:{start}"
        bad = next((bad_lines[n] for n in range(start, prev + 1) if n in bad_lines), None)
        if header is None:
            if bad:
                raise bad
            header = [h.strip() for h in row]
            if len(header) == 1 and delimiter == "," and ";" in header[0]:
                raise DataError(source, f"the CSV header is one column, {header[0]!r}: write the file with "
                                        "commas between fields (pandas: sep=',') or as JSONL")
            index = len(header) > 1 and header[0] == ""  # pandas' to_csv() writes its index unnamed, first
            dupes = [h for h, c in Counter(header[index:]).items() if c > 1 or not h]
            if dupes:
                raise DataError(source, f"CSV header has empty or repeated column names: {dupes}")
            continue
        if bad:
            yield source, _Bad(bad, delimiter.join(row))
        elif len(row) != len(header):
            yield source, _Bad(RecordError(source, "wrong field count",
                                           f"{len(row)} fields, the header has {len(header)}"), row)
        else:
            try:
                record = _present({k: _csv_cell(k, v, source) for k, v in zip(header, row) if k})
            except RecordError as e:
                yield source, _Bad(e, row)
            else:
                yield source, record


def _read_parquet(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise SftlabError(f"{path}: not a readable Parquet file ({e})") from None
    yield from _batched_rows(pf.iter_batches(batch_size=BATCH_ROWS), str(path), "corrupt Parquet",
                             lambda batch: batch.to_pylist())


def _dataset_rows(ds, label: str) -> Iterator[tuple[str, Any]]:
    yield from _batched_rows(ds.iter(batch_size=BATCH_ROWS), label, "corrupt Arrow data",
                             lambda batch: (dict(zip(batch.keys(), values)) for values in zip(*batch.values())))


def _batched_rows(batches: Iterator, label: str, kind: str, records) -> Iterator[tuple[str, Any]]:
    """(label:row N, record) for the `records(batch)` of each batch; a batch that cannot be read
    (corrupt pages: the footer was readable, the data is not) rejects the rest of the file."""
    import pyarrow as pa

    n = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as e:
            source = f"{label}:row {n + 1}"
            yield source, _rest_of_file(RecordError(source, kind, _first_line(e)))
            return
        for rec in records(batch):
            n += 1
            yield f"{label}:row {n}", _present({k: v for k, v in rec.items() if not k.startswith(_PANDAS_INDEX)})


def _first_line(e: Exception) -> str:
    return next((ln for ln in str(e).splitlines() if ln.strip()), e.__class__.__name__).strip()


def _read_saved_dataset(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except (pa.ArrowException, OSError, ValueError) as e:  # missing or damaged files in the folder
        raise SftlabError(f"{path}: not a readable saved Hugging Face dataset ({_first_line(e)})") from None
    label = str(path)
    if isinstance(ds, DatasetDict):
        name = _pick_split(list(ds.keys()), split, str(path))
        ds, label = ds[name], f"{path}[{name}]"
    yield from _dataset_rows(ds, label)


def _read_hub(name: str, split: str | None) -> Iterator[tuple[str, Any]]:
    from datasets import DatasetDict, load_dataset

    name = name.removeprefix("hf://")
    try:
        ds = load_dataset(name, split=split)
    except (OSError, ValueError, ConnectionError) as e:
        raise SftlabError(f"cannot load dataset '{name}' (not a local file; as a Hugging Face dataset id it "
                          f"needs the network or the local cache): {_first_line(e)}") from None
    if isinstance(ds, DatasetDict):
        chosen = _pick_split(list(ds.keys()), split, name)
        ds, name = ds[chosen], f"{name}[{chosen}]"
    yield from _dataset_rows(ds, name)


def _read_data_folder(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    """A folder of data files laid out as on the Hub (a downloaded snapshot: README.md's `configs`, or
    data/train-*.parquet, train.jsonl, ...): each split's files found by datasets' own rules
    (`load_dataset_builder`), then read one by one by sftlab's reader for their type, so an error names
    the file and line."""
    from datasets import load_dataset_builder

    try:
        files = load_dataset_builder(str(path)).config.data_files or {}
    except (OSError, ValueError) as e:  # no data files in it (EmptyDatasetError), several configs and no default
        raise SftlabError(f"{path} is a folder, but neither a saved Hugging Face dataset (no dataset_info.json) nor "
                          f"a folder of data files: {_first_line(e)}") from None
    splits = {str(name): found for name, found in files.items()}
    for file in splits[_pick_split(list(splits), split, str(path))]:
        yield from _raw_records(file, None)


READERS: dict[str, Callable[[Path, str | None], Iterator[tuple[str, Any]]]] = {
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".tsv": partial(_read_csv, delimiter="\t"),
    ".parquet": _read_parquet,
}


def _raw_records(path: str | Path, split: str | None) -> Iterator[tuple[str, Any]]:
    p = Path(path)
    if p.is_dir():
        if any((p / f).exists() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
            return _read_saved_dataset(p, split)
        return _read_data_folder(p, split)
    suffix = p.suffix.lower()
    if p.is_file():
        compressed = suffix in COMPRESSED and len(p.suffixes) > 1
        if compressed:
            suffix = p.suffixes[-2].lower()
        if suffix not in READERS or (compressed and suffix == ".parquet"):
            raise SftlabError(f"{p}: unsupported file type '{''.join(p.suffixes[-2:]) if compressed else suffix}'; "
                              f"supported: {', '.join(READERS)} (all but .parquet also compressed: "
                              f"{', '.join(COMPRESSED)}, e.g. .jsonl.gz), a saved HF dataset folder, a folder of "
                              "data files, or an HF dataset id")
        if compressed:
            return _decompressed(p, READERS[suffix], split)
        if suffix != ".parquet":
            _check_not_wide(p)
        return READERS[suffix](p, split)
    if suffix in READERS or suffix in COMPRESSED or not _HUB_ID.match(str(path)):
        raise SftlabError(f"file not found: {p}")
    return _read_hub(str(path), split)


def _decompressed(path: Path, reader, split: str | None) -> Iterator[tuple[str, Any]]:
    """A compressed file's records; data that is not what its suffix says, or ends early, is an error naming
    the file."""
    kind = COMPRESSED[path.suffix.lower()][1]
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, lzma.LZMAError)
    if kind == "zstd":
        import zstandard

        errors += (zstandard.ZstdError,)
    try:
        _check_not_wide(path)
        yield from reader(path, split)
    except errors as e:
        raise SftlabError(f"{path}: not a readable {kind} file ({_first_line(e)})") from None


def _check_mode(on_error: str, rejects: RejectLog | None) -> None:
    if on_error not in ON_ERROR:
        raise SftlabError(f"on_error must be one of {ON_ERROR}, got '{on_error}'")
    if on_error == "skip" and rejects is None:
        raise ValueError("on_error='skip' needs a RejectLog to count (and write) the rejected records")


def iter_records(path: str | Path, *, split: str | None = None, on_error: str = "raise",
                 rejects: RejectLog | None = None, trees: bool = True) -> Iterator[tuple[str, Any]]:
    """(source, raw record) pairs, streamed. Unreadable records raise or go to `rejects`. OpenAssistant
    message rows are gathered into one conversation record per tree (see data/oasst.py) unless
    `trees` is off (a format was given: `text` trains each message alone)."""
    _check_mode(on_error, rejects)
    records = _good_records(path, split, on_error, rejects)
    first = next(records, None)
    if first is None:
        return
    if trees and is_message_row(first[1]):
        yield from conversations_from_trees(chain([first], records))
    else:
        yield first
        yield from records


def _good_records(path: str | Path, split: str | None, on_error: str, rejects: RejectLog | None
                  ) -> Iterator[tuple[str, Any]]:
    for source, rec in _raw_records(path, split):
        if isinstance(rec, _Bad):
            if on_error == "raise":
                raise rec.error
            rejects.add_error(rec.error, rec.raw)
        else:
            yield source, rec


def iter_conversations(path: str | Path, format: str | None = None, split: str | None = None,
                       on_error: str = "raise", rejects: RejectLog | None = None) -> Iterator[Conversation]:
    """Conversations from any supported input; `format` overrides per-record schema detection."""
    check_format_name(format)
    hinted = format is not None
    for source, rec in iter_records(path, split=split, on_error=on_error, rejects=rejects, trees=format is None):
        try:
            conv = to_conversation(rec, source, format)
            if not hinted and conv.text is not None and "label" in rec:
                hinted = True
                warnings.warn(f"{path}: records of 'text' and 'label' are read as raw text (continued pre-training), "
                              "the label unused; to train text -> label, map the columns: --columns "
                              "prompt=text,response=label (data.columns in a config)", stacklevel=1)
            yield conv
        except RecordError as e:
            if on_error == "raise":
                raise
            rejects.add_error(e, rec)


def load_conversations(path: str | Path, format: str | None = None, split: str | None = None,
                       on_error: str = "raise", rejects: RejectLog | None = None) -> list[Conversation]:
    return list(iter_conversations(path, format=format, split=split, on_error=on_error, rejects=rejects))


class Reading:
    """Conversations read from one input in strict mode (the first bad record raises) or skip
    mode (bad records go to a `RejectLog`, written to `rejects_path` if given), with the counts
    every command reports: records in = kept + rejected.

    Iterate it to stream the conversations (or call `load()` for a list); a step after reading
    that finds a conversation unusable (a chat template that raises) passes it to `reject`.
    """

    def __init__(self, path: str | Path, *, format: str | Columns | None = None, split: str | None = None,
                 skip: bool = False, rejects_path: str | Path | None = None):
        self.path, self.format, self.split, self.skip = str(path), format, split, skip
        self.rejects = RejectLog(rejects_path if skip else None)
        self.read = 0  # conversations handed on, including those rejected later by `reject`
        self.later = 0  # of those, rejected after reading

    def __iter__(self) -> Iterator[Conversation]:
        for conv in iter_conversations(self.path, format=self.format, split=self.split,
                                       on_error="skip" if self.skip else "raise", rejects=self.rejects):
            self.read += 1
            yield conv
        if self.skip:
            refuse_if_no_record_fits(self.path, self.read, self.rejects)

    def load(self) -> list[Conversation]:
        with self:
            return list(self)

    def __enter__(self) -> Reading:
        return self

    def __exit__(self, *exc) -> None:
        self.rejects.close()

    def reject(self, err: DataError, raw: Any) -> None:
        """A conversation found unusable after reading: raises in strict mode, else is counted."""
        if not self.skip:
            raise err
        self.rejects.add_error(err, raw)
        self.later += 1

    @property
    def rejected(self) -> int:
        return self.rejects.total

    @property
    def kept(self) -> int:
        return self.read - self.later

    @property
    def records_in(self) -> int:
        return self.kept + self.rejected

    @property
    def rejects_file(self) -> str | None:
        return str(self.rejects.path) if self.rejected and self.rejects.path else None

    def to_json(self) -> dict[str, Any]:
        return {"input": self.path, "records_in": self.records_in, "kept": self.kept, "rejected": self.rejected,
                "rejected_by_reason": self.rejects.summary(), "rejects_file": self.rejects_file}

    def report_lines(self) -> list[str]:
        """What skip mode tells the user: the counts, the rejects by kind, where they were written."""
        return [f"records in {self.records_in}: kept {self.kept}, rejected {self.rejected}",
                *reject_lines(self.rejects.summary(), self.rejects_file)]


def refuse_if_no_record_fits(path: str | Path, converted: int, rejects: RejectLog) -> None:
    """Skip mode counts bad records; when no record has the fields the format or column mapping reads,
    the mapping is wrong, not the records: one error instead of every record counted."""
    if not converted and set(rejects.counts) == {"missing field"}:
        raise SftlabError(f"{path}: every record ({rejects.total}) lacks a field the format or column mapping "
                          "reads: rerun without --skip to see the first one's error")


def as_reading(data: str | Path | Reading, format: str | Columns | None = None, split: str | None = None) -> Reading:
    """`data` itself when it is a Reading (the caller chose the mode), else a strict one of it."""
    return data if isinstance(data, Reading) else Reading(data, format=format, split=split)


def reject_lines(by_kind: dict[str, int], rejects_file: str | Path | None) -> list[str]:
    """Rejects by kind, most frequent first, and where they were written."""
    lines = [f"  rejected  {n:>7}  {kind}" for kind, n in by_kind.items()]
    if rejects_file and by_kind:
        lines.append(f"rejects written to {rejects_file}")
    return lines


def writes_parquet(path: str | Path) -> bool:
    """Whether a dataset output is Parquet (else JSONL); an error for any other name. Commands check
    their output this way before reading their input."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".parquet", ".jsonl", ".ndjson"):
        raise SftlabError(f"{path}: output must end in .jsonl or .parquet")
    return suffix == ".parquet"


class ConversationWriter:
    """Stream conversations to JSONL, or to Parquet when the path ends in .parquet.

    Written to a temporary file and renamed on a clean close, so a failed run never leaves a
    half-written dataset behind.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.parquet = writes_parquet(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.count = 0
        self._rows: list[dict] = []
        self._writer = None
        self._fh = None if self.parquet else open(self.tmp, "w", encoding="utf-8")

    def write(self, conv: Conversation) -> None:
        self.count += 1
        if self._fh is not None:
            self._fh.write(json.dumps(conv.to_json(), ensure_ascii=False, default=jsonable) + "\n")
            return
        self._rows.append(conv.to_json())
        if len(self._rows) >= BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._rows:
            return
        keys = list(dict.fromkeys(k for r in self._rows for k in r))  # every key, not just the first row's
        if self._writer is not None and not set(keys) <= set(self._writer.schema.names):
            extra = sorted(set(keys) - set(self._writer.schema.names))
            raise SftlabError(f"{self.path}: later records add fields {extra} not in the Parquet schema; write .jsonl instead")
        names = self._writer.schema.names if self._writer is not None else keys
        try:
            table = pa.table({k: [r.get(k) for r in self._rows] for k in names},
                             schema=self._writer.schema if self._writer is not None else None)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise SftlabError(f"{self.path}: records do not share one Parquet schema ({e}); write .jsonl instead") from None
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.tmp, table.schema)
        self._writer.write_table(table)
        self._rows = []

    def close(self, ok: bool = True) -> None:
        if self.parquet:
            if ok:
                self._flush()
                if self._writer is None:  # no records: still write a valid (empty) file
                    import pyarrow as pa
                    import pyarrow.parquet as pq

                    pq.write_table(pa.table({}), self.tmp)
            if self._writer is not None:
                self._writer.close()
        elif self._fh is not None:
            self._fh.close()
        if ok:
            self.tmp.replace(self.path)
        else:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> ConversationWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(ok=exc_type is None)


def save_conversations(path: str | Path, conversations: Iterable[Conversation]) -> int:
    """Write conversations (JSONL or Parquet by extension); returns how many."""
    with ConversationWriter(path) as w:
        for conv in conversations:
            w.write(conv)
    return w.count
