"""The native Twinkle API's processor app: server-side datasets and data loaders, as twinkle_client's
`Dataset`, `LazyDataset`, `DataLoader` and `InputProcessor` wrappers call them
(`POST /api/v1/processor/twinkle/create` and `/call`; docs/twinkle-native.md).

An object is made by `create` and named by a processor id, `pid:<32 hex>`; `call` runs one of its
methods. Every object belongs to the (tenant, session) that made it: another tenant's or another
session's id is "not found", exactly like a missing one. Objects live in this server process's
memory (as the sampler's set_template choices do), bounded per tenant (MAX_OBJECTS, MAX_ROWS,
MAX_BYTES) and in all (server/ops/native_store.py); they go with their session (every call checks
it is live; native_store.drop_session is the hook for a session's end).

Rows come in the request (`DatasetMeta(data=[...])`) or from a file the tenant uploaded
(`POST /v1/files`, then `DatasetMeta(dataset_id="file-…")`, server/ops/files.py): this server loads
nothing from a hub or from a server path, and writes no datasets (`save_as` is refused). `map` /
`filter` name functions of an allow-list (server/ops/native_preprocessors.py); `encode` is
Twinkle's Template on the served base model's tokenizer (server/ops/native_encode.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from sqlalchemy import select

from server.errors import Gone, InvalidRequest
from server.ops import files, text
from server.ops import native_preprocessors as prep
from server.ops.file_rows import MAX_ROWS
from server.ops.native_encode import TRUNCATIONS, DataTemplate, encode_row
from server.ops.native_sampling import TEMPLATE_NAMES
from server.ops.native_service import SESSION_FIELD
from server.ops.native_store import STORE, Entry
from server.ops.sessions import live_session
from server.runtime import Runtime
from server.store.tables import Session as SessionRow

log = logging.getLogger(__name__)

# ----- bounds (per tenant, all its sessions together; rows and bytes of every dataset it holds) ----
MAX_OBJECTS = 64
MAX_BYTES = 64 * 2**20  # rows as JSON
MAX_BATCH_SIZE = 4096
DEFAULT_SEED = 42  # Twinkle's (its sampler stack's and torch's global seed)

PID = "pid:"
DATASETS = ("Dataset", "LazyDataset")
CLASSES = {"dataset": DATASETS, "dataloader": ("DataLoader",), "processor": ("InputProcessor",)}
NOT_HERE = {
    "PackingDataset": "sequence packing is not offered: send a Dataset's rows to forward_backward as they are",
    "IterablePackingDataset": "sequence packing is not offered: use Dataset or LazyDataset",
    "IterableDataset": "streaming needs a hub or a server path, which this server does not read: use Dataset",
}
# datasets.map / load_dataset options that change nothing for rows held in memory
LOAD_IGNORED = frozenset({"num_proc", "streaming", "revision", "trust_remote_code", "keep_in_memory"})
MAP_IGNORED = frozenset({"batched", "batch_size", "num_proc", "load_from_cache_file", "desc", "keep_in_memory",
                         "writer_batch_size"})
LOADER_IGNORED = frozenset({"num_workers", "pin_memory", "prefetch_factor", "persistent_workers", "timeout",
                            "max_retries", "remote_group"})
Row = dict[str, Any]
MIXED = "\0mixed"  # the key of a dataset's mixed rows
FILE_SCHEME = "file://"  # DatasetMeta(dataset_id="file://file-…") names an uploaded file, as "file-…" does


class Exhausted(Exception):
    """A data loader's epoch has no more batches: the route answers 410, which the client turns
    into StopIteration (the only 410 this API sends)."""


# ----- objects -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Table:
    rows: list[Row]
    nbytes: int

    @staticmethod
    def of(rows: list[Row]) -> Table:
        return Table(rows, sum(len(json.dumps(r, ensure_ascii=False)) for r in rows))


@dataclass(frozen=True)
class Deferred:
    """LazyDataset's encode (or check only), applied to a row when it is read."""

    template: DataTemplate
    encode: bool
    add_generation_prompt: bool = False
    remove: tuple[str, ...] = ()


@dataclass
class DatasetObj:
    lazy: bool
    sources: dict[str, Table] = field(default_factory=dict)  # in the order they were added
    mixed: Table | None = None
    template: DataTemplate | None = None
    deferred: Deferred | None = None

    def view(self) -> list[Row]:
        """What __getitem__, __len__ and a loader see: the mixed rows, else the first dataset's (Twinkle's)."""
        if self.mixed is not None:
            return self.mixed.rows
        return next(iter(self.sources.values())).rows if self.sources else []

    def size(self) -> tuple[int, int]:
        tables = [*self.sources.values(), *([self.mixed] if self.mixed else [])]
        return sum(len(t.rows) for t in tables), sum(t.nbytes for t in tables)


@dataclass
class Epoch:
    rows: list[Row]  # the dataset's rows when the epoch began (later changes start with the next one)
    order: list[int]
    deferred: Deferred | None
    tokenizer: text.Tokenizer | None
    pos: int = 0


@dataclass
class LoaderObj:
    dataset: str  # its dataset's pid
    batch_size: int
    shuffle: bool = False
    seed: int = DEFAULT_SEED
    drop_last: bool = False
    min_batch_size: int | None = None
    consumed: int = 0  # rows served, all epochs
    epochs: int = 0  # epochs begun
    skip: int | None = None  # skip_consumed_samples: where the next epoch begins
    epoch: Epoch | None = None
    padding: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProcessorObj:
    """InputProcessor: padding options only; padding is the model's business here."""

    options: dict[str, Any]


@dataclass(frozen=True)
class Ctx:
    rt: Runtime
    tenant_id: str
    session_id: str
    entry: Entry | None = None


# ----- the two routes ------------------------------------------------------------------------------
async def create(rt: Runtime, tenant_id: str, session_id: str | None, processor_type: str, class_type: str,
                 kwargs: dict[str, Any]) -> str:
    """A new object of an allowed class; its processor id."""
    ctx = Ctx(rt, tenant_id, await _session(rt, tenant_id, session_id))
    kind = _class(processor_type, class_type)
    STORE.sweep()
    await _room_for_object(ctx)
    obj = await MAKERS[kind](ctx, dict(kwargs))
    pid = PID + secrets.token_hex(16)
    STORE.add(Entry(pid, tenant_id, ctx.session_id, kind, obj))
    log.info("native_processor_created", extra={"tenant_id": tenant_id, "kind": kind, "processor_id": pid})
    return pid


async def call(rt: Runtime, tenant_id: str, session_id: str | None, processor_id: str, function: str,
               kwargs: dict[str, Any]) -> Any:
    """Run one method of one of the caller's objects (one at a time per object)."""
    session = await _session(rt, tenant_id, session_id)
    STORE.sweep()
    entry = STORE.find(tenant_id, session, processor_id, "processor_id")
    methods = METHODS[entry.kind]
    if function not in methods:
        reason = REFUSED.get(function)
        message = f"{function} is refused: {reason}" if reason else f"{entry.kind} has no method {function!r}"
        raise InvalidRequest(f"{message}; allowed: {', '.join(methods) or 'none'}", field="function")
    async with entry.lock:
        return await methods[function](Ctx(rt, tenant_id, session, entry), dict(kwargs))


async def _session(rt: Runtime, tenant_id: str, session_id: str | None) -> str:
    """The caller's live session; its objects go once it has ended."""
    if session_id is None:
        raise InvalidRequest("send the session id (twinkle_client's init_twinkle_client does)", field=SESSION_FIELD)
    try:
        await rt.db.run(lambda s: live_session(s, tenant_id, session_id, field=SESSION_FIELD))
    except Gone:
        STORE.drop_session(session_id)
        raise
    return session_id


def _class(processor_type: str, class_type: str) -> str:
    if class_type in NOT_HERE:
        raise InvalidRequest(f"{class_type} is not supported: {NOT_HERE[class_type]}", field="class_type")
    if class_type not in CLASSES.get(processor_type, ()):
        allowed = "; ".join(f"{t}: {', '.join(c)}" for t, c in CLASSES.items())
        raise InvalidRequest(f"unknown {processor_type!r} class {class_type!r}; allowed: {allowed}",
                             field="class_type" if processor_type in CLASSES else "processor_type")
    return class_type


# ----- bounds --------------------------------------------------------------------------------------
async def _room_for_object(ctx: Ctx) -> None:
    if len(STORE.of_tenant(ctx.tenant_id)) >= MAX_OBJECTS:
        await _purge_ended(ctx.rt, ctx.tenant_id)
    if len(STORE.of_tenant(ctx.tenant_id)) >= MAX_OBJECTS:
        raise InvalidRequest(f"this tenant holds {MAX_OBJECTS} processor objects, the most it may; they are "
                             "released when their session ends", field="processor_type")


async def _fits(ctx: Ctx, obj: DatasetObj, field_name: str) -> None:
    """Refuse a dataset that would take the tenant's rows or bytes over its bounds."""
    over = _over(ctx, obj)
    if over:
        await _purge_ended(ctx.rt, ctx.tenant_id)
        over = _over(ctx, obj)
    if over:
        raise InvalidRequest(f"{over}; smaller datasets, or fewer at once (they are released when their session "
                             "ends)", field=field_name)


def _over(ctx: Ctx, obj: DatasetObj) -> str | None:
    own = ctx.entry.pid if ctx.entry else None
    rows, nbytes = obj.size()
    for e in STORE.of_tenant(ctx.tenant_id):
        if e.pid != own and isinstance(e.obj, DatasetObj):
            r, b = e.obj.size()
            rows, nbytes = rows + r, nbytes + b
    if rows > MAX_ROWS:
        return f"this tenant's datasets would hold {rows} rows, over the limit of {MAX_ROWS}"
    if nbytes > MAX_BYTES:
        return f"this tenant's datasets would hold {nbytes} bytes of rows, over the limit of {MAX_BYTES}"
    return None


async def _purge_ended(rt: Runtime, tenant_id: str) -> None:
    """Drop the tenant's objects whose sessions have ended (in case nobody called drop_session)."""
    sessions = {e.session_id for e in STORE.of_tenant(tenant_id)}
    query = select(SessionRow.id).where(SessionRow.id.in_(list(sessions)), SessionRow.finished_at.is_(None))
    live = set(await rt.db.run(lambda s: list(s.scalars(query))))
    for session_id in sessions - live:
        STORE.drop_session(session_id)


# ----- arguments -----------------------------------------------------------------------------------
def pop_bool(kw: dict[str, Any], key: str, default: bool) -> bool:
    value = kw.pop(key, default)
    if not isinstance(value, bool):
        raise InvalidRequest("must be true or false", field=key)
    return value


def pop_int(kw: dict[str, Any], key: str, default: int | None, low: int = 0, high: int | None = None) -> int | None:
    value = kw.pop(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bounds = f"at least {low}" + (f" and at most {high}" if high is not None else "")
        raise InvalidRequest(f"must be an integer, {bounds}", field=key)
    return value


def pop_str(kw: dict[str, Any], key: str, default: str | None) -> str | None:
    value = kw.pop(key, default)
    if value is not None and not isinstance(value, str):
        raise InvalidRequest("must be a string", field=key)
    return value


def no_more(kw: dict[str, Any], what: str, ignored: frozenset[str] = frozenset()) -> None:
    """Unknown arguments are refused by name, never ignored (those in `ignored` change nothing here)."""
    for key in kw:
        if key not in ignored:
            raise InvalidRequest(f"{what} takes no argument {key!r} here", field=key)


def remove_columns(kw: dict[str, Any]) -> tuple[str, ...]:
    value = kw.pop("remove_columns", None)
    names = [value] if isinstance(value, str) else value if isinstance(value, list) else [] if value is None else None
    if names is None or not all(isinstance(n, str) for n in names):
        raise InvalidRequest("a column name or a list of them", field="remove_columns")
    return tuple(names)


# ----- DatasetMeta ---------------------------------------------------------------------------------
def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@dataclass(frozen=True)
class Meta:
    key: str  # what map/filter/add_dataset name a source by
    field: str  # where its rows came from, for errors about their size
    rows: list[Row] | None = None  # sent in the request (sliced already)
    file_id: str | None = None  # an uploaded file's (to read, then slice)
    data_slice: Any = None


def parse_meta(value: Any, where: str) -> Meta:
    """DatasetMeta as the client sends it (a JSON string tagged _TWINKLE_TYPE_), or as an object:
    its rows in `data`, or the id of a file the tenant uploaded in `dataset_id`."""
    if isinstance(value, str):
        try:
            value = json.loads(value, parse_constant=_no_constant)
        except ValueError:
            raise InvalidRequest("not a serialised DatasetMeta (JSON)", field=where) from None
    if not isinstance(value, dict) or value.get("_TWINKLE_TYPE_", "DatasetMeta") != "DatasetMeta":
        raise InvalidRequest("a DatasetMeta", field=where)
    data = value.get("data")
    if data is None:
        if value.get("dataset_id"):
            return _file_meta(value, where)
        raise InvalidRequest("either data or dataset_id must be provided (send the rows in data, or name a file "
                             "you uploaded)", field=where)
    rows = apply_slice(rows_of(data, f"{where}.data"), value.get("data_slice"), f"{where}.data_slice")
    identity = [data, value.get("subset_name", "default"), value.get("split", "train"), value.get("data_slice")]
    return Meta(f"memory:{_digest(identity)}", f"{where}.data", rows=rows)


def _digest(identity: list[Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def _file_meta(value: dict[str, Any], where: str) -> Meta:
    """A file the tenant uploaded (POST /v1/files), named `file-…` or `file://file-…`. Nothing
    else is a dataset id here: no hub, and no server paths."""
    dataset_id, field_name = value["dataset_id"], f"{where}.dataset_id"
    file_id = dataset_id.removeprefix(FILE_SCHEME) if isinstance(dataset_id, str) else None
    if file_id is None or not files.FILE_ID.fullmatch(file_id):
        raise InvalidRequest("names no uploaded file: this server loads no datasets from a hub or from its own "
                             "disk; upload the file (POST /v1/files) and name it, DatasetMeta(dataset_id='file-…'), "
                             "or send the rows, DatasetMeta(data=[{...}, ...])", field=field_name)
    if value.get("subset_name", "default") not in ("default", None):
        raise InvalidRequest("an uploaded file has one subset, 'default'", field=f"{where}.subset_name")
    if value.get("split", "train") not in ("train", None):
        raise InvalidRequest("an uploaded file has one split, 'train'", field=f"{where}.split")
    data_slice = value.get("data_slice")
    if data_slice is not None:
        _slice_indices(data_slice, f"{where}.data_slice")  # refused before the file is read
    return Meta(f"file:{file_id}:{_digest([data_slice])}", field_name, file_id=file_id, data_slice=data_slice)


def rows_of(data: Any, where: str) -> list[Row]:
    """Rows (a list of objects) or columns (an object of equal-length lists), as DatasetMeta.data."""
    if isinstance(data, dict):
        lengths = {len(v) if isinstance(v, list) else -1 for v in data.values()}
        if len(lengths) > 1 or -1 in lengths:
            raise InvalidRequest("columns must be lists of one length", field=where)
        n = lengths.pop() if lengths else 0
        if n > MAX_ROWS:
            raise InvalidRequest(f"{n} rows, over the limit of {MAX_ROWS}", field=where)
        return [{k: v[i] for k, v in data.items()} for i in range(n)]
    if not isinstance(data, list):
        raise InvalidRequest("a list of rows (objects) or an object of columns", field=where)
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise InvalidRequest("each row must be an object", field=f"{where}[{i}]")
    if len(data) > MAX_ROWS:
        raise InvalidRequest(f"{len(data)} rows, over the limit of {MAX_ROWS}", field=where)
    return data


def apply_slice(rows: list[Row], data_slice: Any, where: str) -> list[Row]:
    """The rows a data_slice picks (a range or a list of indices; past the end it wraps, as Twinkle's)."""
    if data_slice is None:
        return rows
    picked = _slice_indices(data_slice, where)
    if picked and not rows:
        raise InvalidRequest("picks rows from an empty dataset", field=where)
    if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in picked):
        raise InvalidRequest("indices must be integers >= 0", field=where)
    return [rows[i % len(rows)] for i in picked]


def _slice_indices(data_slice: Any, where: str) -> list[Any]:
    kind = data_slice.get("_slice_type_") if isinstance(data_slice, dict) else "list" if isinstance(
        data_slice, list) else None
    if kind == "range":
        try:
            picked = range(data_slice["start"], data_slice["stop"], data_slice["step"])
        except (KeyError, TypeError, ValueError):
            raise InvalidRequest("a range: start, stop, step (integers)", field=where) from None
    elif kind == "list":
        picked = data_slice["values"] if isinstance(data_slice, dict) else data_slice
        if not isinstance(picked, list):
            raise InvalidRequest("a list of indices", field=where)
    else:
        raise InvalidRequest("a range or a list of row indices", field=where)
    if len(picked) > MAX_ROWS:
        raise InvalidRequest(f"picks {len(picked)} rows, over the limit of {MAX_ROWS}", field=where)
    return list(picked)


async def load_meta(ctx: Ctx, value: Any, where: str) -> tuple[Meta, Table]:
    """A DatasetMeta and its rows (parsed, read and measured off the event loop)."""
    meta = await asyncio.to_thread(parse_meta, value, where)
    if meta.file_id is None:
        return meta, await asyncio.to_thread(Table.of, meta.rows or [])
    rows = await files.dataset_rows(ctx.rt, ctx.tenant_id, meta.file_id, meta.field)
    return meta, await asyncio.to_thread(
        lambda: Table.of(apply_slice(rows, meta.data_slice, f"{where}.data_slice")))


# ----- Dataset / LazyDataset -----------------------------------------------------------------------
async def new_dataset(ctx: Ctx, kw: dict[str, Any], *, lazy: bool) -> DatasetObj:
    meta = kw.pop("dataset_meta", None)
    no_more(kw, "Dataset", LOAD_IGNORED)
    obj = DatasetObj(lazy=lazy)
    if meta is None:
        return obj
    parsed, table = await load_meta(ctx, meta, "dataset_meta")
    obj.sources[parsed.key] = table
    await _fits(ctx, obj, parsed.field)
    return obj


def _dataset(ctx: Ctx) -> DatasetObj:
    assert ctx.entry is not None
    return ctx.entry.obj


def _template(obj: DatasetObj) -> DataTemplate:
    if obj.template is None:
        raise InvalidRequest("call set_template first (it chooses the tokenizer and the chat template)",
                             field="function")
    return obj.template


async def set_template(ctx: Ctx, kw: dict[str, Any]) -> None:
    """Twinkle's Template options; every name renders with the served base model's own chat template."""
    name = kw.pop("template_func", kw.pop("template_cls", None))
    if name not in TEMPLATE_NAMES:
        raise InvalidRequest(f"unknown template {name!r}; allowed: {', '.join(TEMPLATE_NAMES)} (each renders with the "
                             "base model's own chat template)", field="template_func")
    model_id = pop_str(kw, "model_id", None)
    base = ctx.rt.served(model_id.split("://", 1)[-1] if model_id else None, field="model_id")
    template = DataTemplate(base=base, name=name, **template_options(kw))
    await text.tokenizer_for(ctx.rt, base)  # loaded now: a failure shows here, not in the middle of encode
    _dataset(ctx).template = template


def template_options(kw: dict[str, Any]) -> dict[str, Any]:
    options = {
        "max_length": pop_int(kw, "max_length", 8192, low=1),
        "truncation_strategy": pop_str(kw, "truncation_strategy", "raise"),
        "default_system": pop_str(kw, "default_system", None),
        "enable_thinking": pop_bool(kw, "enable_thinking", True),
        "use_chat_template": pop_bool(kw, "use_chat_template", True),
    }
    if options["truncation_strategy"] not in TRUNCATIONS:
        why = " ('split' cuts chats into pieces whose labels Twinkle misaligns)" if options[
            "truncation_strategy"] == "split" else ""
        raise InvalidRequest(f"one of {', '.join(TRUNCATIONS)}{why}", field="truncation_strategy")
    no_more(kw, "set_template")
    return options


def targets(obj: DatasetObj, key: str | None) -> list[str]:
    """The tables an operation changes: the mixed rows once mixed (as Twinkle's), else the named
    dataset, else every added dataset."""
    if obj.mixed is not None:
        return [MIXED]
    if key is not None:
        if key not in obj.sources:
            raise InvalidRequest("names no dataset loaded into this one (send the same DatasetMeta that was loaded)",
                                 field="dataset_meta")
        return [key]
    return list(obj.sources)


def table_of(obj: DatasetObj, key: str) -> Table:
    return obj.mixed if key == MIXED else obj.sources[key]  # type: ignore[return-value]


def with_tables(obj: DatasetObj, tables: dict[str, Table]) -> DatasetObj:
    sources = {k: tables.get(k, t) for k, t in obj.sources.items()}
    return replace(obj, sources=sources, mixed=tables.get(MIXED, obj.mixed))


def where_of(obj: DatasetObj, key: str) -> str:
    """How errors name a table's rows: `dataset[i]` for the rows the dataset shows, else the added one's."""
    keys = list(obj.sources)
    return "dataset" if key == MIXED or key == keys[0] else f"added_dataset[{keys.index(key)}]"


async def transform(ctx: Ctx, obj: DatasetObj, keys: list[str], each: Callable[[Row, str], Row | None],
                    field_name: str) -> None:
    """Every row of the tables through `each` (None drops it), in a thread; committed if it fits."""
    def work() -> dict[str, Table]:
        out = {}
        for key in keys:
            where = where_of(obj, key)
            rows = (each(row, f"{where}[{i}]") for i, row in enumerate(table_of(obj, key).rows))
            out[key] = Table.of([r for r in rows if r is not None])
        return out

    new = with_tables(obj, await asyncio.to_thread(work))
    await _fits(ctx, new, field_name)
    assert ctx.entry is not None
    ctx.entry.obj = new


async def meta_key(kw: dict[str, Any]) -> str | None:
    meta = kw.pop("dataset_meta", None)
    return None if meta is None else (await asyncio.to_thread(parse_meta, meta, "dataset_meta")).key


def stripped(row: Row, remove: tuple[str, ...]) -> Row:
    return {k: v for k, v in row.items() if k not in remove} if remove else row


async def map_rows(ctx: Ctx, kw: dict[str, Any]) -> None:
    """A named preprocessor over the rows; its columns merge into each row (as datasets.map's)."""
    fn = prep.pick(prep.PREPROCESSORS, kw.pop("preprocess_func", None), kw.pop("init_args", None),
                   "preprocess_func", "preprocessor")
    key, remove = await meta_key(kw), remove_columns(kw)
    no_more(kw, "map", MAP_IGNORED)
    obj = _dataset(ctx)
    await transform(ctx, obj, targets(obj, key), lambda row, where: {**stripped(row, remove), **fn(row, where)},
                    "preprocess_func")


async def filter_rows(ctx: Ctx, kw: dict[str, Any]) -> None:
    fn = prep.pick(prep.FILTERS, kw.pop("filter_func", None), kw.pop("init_args", None), "filter_func", "filter")
    key = await meta_key(kw)
    no_more(kw, "filter", MAP_IGNORED)
    obj = _dataset(ctx)
    await transform(ctx, obj, targets(obj, key), lambda row, where: row if fn(row, where) else None, "filter_func")


async def encode(ctx: Ctx, kw: dict[str, Any]) -> None:
    """Rows of chat messages -> InputFeatures (eager; a LazyDataset encodes each row when read)."""
    obj = _dataset(ctx)
    template = _template(obj)
    generation, remove = pop_bool(kw, "add_generation_prompt", False), remove_columns(kw)
    no_more(kw, "encode", MAP_IGNORED)
    if obj.lazy:
        obj.deferred = Deferred(template, encode=True, add_generation_prompt=generation, remove=remove)
        return
    tokenizer = await text.tokenizer_for(ctx.rt, template.base)

    def each(row: Row, where: str) -> Row | None:
        return encode_row(tokenizer, template, stripped(row, remove), where, add_generation_prompt=generation)

    await transform(ctx, obj, targets(obj, None), each, "function")


async def check(ctx: Ctx, kw: dict[str, Any]) -> None:
    """Keep the rows the template can encode (Twinkle's check); a LazyDataset reads the others as null."""
    obj = _dataset(ctx)
    template = _template(obj)
    no_more(kw, "check", MAP_IGNORED)
    if obj.lazy:
        obj.deferred = obj.deferred or Deferred(template, encode=False)
        return
    tokenizer = await text.tokenizer_for(ctx.rt, template.base)
    await transform(ctx, obj, targets(obj, None), lambda row, where: row if encodes(tokenizer, template, row, where)
                    else None, "function")


def encodes(tokenizer: text.Tokenizer, template: DataTemplate, row: Row, where: str) -> bool:
    try:
        return encode_row(tokenizer, template, row, where) is not None
    except Exception:  # noqa: BLE001 - Twinkle's check drops a row whatever its encoding raises
        return False


async def add_dataset(ctx: Ctx, kw: dict[str, Any]) -> None:
    meta = kw.pop("dataset_meta", None)
    if meta is None:
        raise InvalidRequest("add_dataset needs a DatasetMeta", field="dataset_meta")
    no_more(kw, "add_dataset", LOAD_IGNORED)
    parsed, table = await load_meta(ctx, meta, "dataset_meta")
    obj = _dataset(ctx)
    new = replace(obj, sources={**obj.sources, parsed.key: table})
    await _fits(ctx, new, parsed.field)
    assert ctx.entry is not None
    ctx.entry.obj = new


async def mix_dataset(ctx: Ctx, kw: dict[str, Any]) -> None:
    """Interleave (round robin until the shortest ends, as datasets.interleave_datasets) or concatenate."""
    interleave = pop_bool(kw, "interleave", True)
    no_more(kw, "mix_dataset")
    obj = _dataset(ctx)
    if len(obj.sources) < 2:
        return  # nothing to mix (Twinkle's too)
    tables = [t.rows for t in obj.sources.values()]
    if interleave:
        rows = [t[i] for i in range(min(map(len, tables))) for t in tables]
    else:
        rows = [r for t in tables for r in t]
    new = replace(obj, mixed=await asyncio.to_thread(Table.of, rows))
    await _fits(ctx, new, "function")
    assert ctx.entry is not None
    ctx.entry.obj = new


async def get_item(ctx: Ctx, kw: dict[str, Any]) -> Row | None:
    key = "idx" if "idx" in kw else "index"
    idx = kw.pop(key, None)
    no_more(kw, "__getitem__")
    obj = _dataset(ctx)
    rows = obj.view()
    if not isinstance(idx, int) or isinstance(idx, bool) or not -len(rows) <= idx < len(rows):
        raise InvalidRequest(f"an integer index into {len(rows)} rows", field=key)
    row, where = rows[idx], f"dataset[{idx % len(rows)}]"
    if obj.deferred is None:
        return row
    tokenizer = await text.tokenizer_for(ctx.rt, obj.deferred.template.base)
    return await asyncio.to_thread(read_row, tokenizer, obj.deferred, row, where)


def read_row(tokenizer: text.Tokenizer | None, deferred: Deferred | None, row: Row, where: str) -> Row | None:
    """A row as a LazyDataset shows it: encoded (None when dropped), or None when it would not encode."""
    if deferred is None or tokenizer is None:
        return row
    if not deferred.encode:
        return row if encodes(tokenizer, deferred.template, row, where) else None
    return encode_row(tokenizer, deferred.template, stripped(row, deferred.remove), where,
                      add_generation_prompt=deferred.add_generation_prompt)


async def length(ctx: Ctx, kw: dict[str, Any]) -> int:
    no_more(kw, "__len__")
    return len(_dataset(ctx).view())


async def flush_save(ctx: Ctx, kw: dict[str, Any]) -> None:
    """Nothing to flush: nothing is saved here (save_as is refused)."""
    no_more(kw, "flush_save")


# ----- DataLoader ----------------------------------------------------------------------------------
async def new_loader(ctx: Ctx, kw: dict[str, Any]) -> LoaderObj:
    dataset = kw.pop("dataset", None)
    if not isinstance(dataset, str) or not dataset.startswith(PID):
        raise InvalidRequest("the processor id of a Dataset (pass the client's Dataset object)", field="dataset")
    if STORE.find(ctx.tenant_id, ctx.session_id, dataset, "dataset").kind not in DATASETS:
        raise InvalidRequest("is not a Dataset or LazyDataset", field="dataset")
    batch_size = pop_int(kw, "batch_size", None, low=1, high=MAX_BATCH_SIZE)
    if batch_size is None:
        raise InvalidRequest(f"required: an integer in [1, {MAX_BATCH_SIZE}]", field="batch_size")
    if kw.pop("device_mesh", None) is not None:
        raise InvalidRequest("is not used here (one data loader per client): send none", field="device_mesh")
    seed = pop_int(kw, "seed", DEFAULT_SEED)
    loader = LoaderObj(dataset=dataset, batch_size=batch_size, shuffle=pop_bool(kw, "shuffle", False),
                       seed=DEFAULT_SEED if seed is None else seed, drop_last=pop_bool(kw, "drop_last", False),
                       min_batch_size=pop_int(kw, "min_batch_size", None, low=1))
    no_more(kw, "DataLoader", LOADER_IGNORED)
    return loader


def _loader(ctx: Ctx) -> LoaderObj:
    assert ctx.entry is not None
    return ctx.entry.obj


def per_epoch(loader: LoaderObj, n: int) -> int:
    """Rows an epoch serves (drop_last leaves out a short last batch)."""
    return (n // loader.batch_size) * loader.batch_size if loader.drop_last else n


async def begin(ctx: Ctx, loader: LoaderObj) -> None:
    """A new epoch over the dataset's rows as they are now: epoch k of a shuffled loader has its own
    order (seeded by (seed, k)); a pending skip starts where that many served rows end."""
    ds: DatasetObj = STORE.find(ctx.tenant_id, ctx.session_id, loader.dataset, "dataset").obj
    rows = ds.view()
    number, offset = loader.epochs, 0
    if loader.skip is not None and per_epoch(loader, len(rows)):
        number, offset = divmod(loader.skip, per_epoch(loader, len(rows)))
    order = np.random.default_rng([loader.seed, number]).permutation(len(rows)).tolist() if loader.shuffle else list(
        range(len(rows)))
    tokenizer = await text.tokenizer_for(ctx.rt, ds.deferred.template.base) if ds.deferred else None
    loader.epoch = Epoch(rows, order[offset:], ds.deferred, tokenizer)
    loader.epochs, loader.skip = number + 1, None


async def loader_iter(ctx: Ctx, kw: dict[str, Any]) -> str:
    no_more(kw, "__iter__")
    await begin(ctx, _loader(ctx))
    return "ok"


async def loader_next(ctx: Ctx, kw: dict[str, Any]) -> list[Row]:
    """The next batch (a list of rows: InputFeatures once encoded); Exhausted at the epoch's end."""
    no_more(kw, "__next__")
    loader = _loader(ctx)
    if loader.epoch is None:
        await begin(ctx, loader)  # next() without iter(): the first epoch
    epoch = loader.epoch
    assert epoch is not None
    STORE.touch(loader.dataset)
    batch, pos = await asyncio.to_thread(take, epoch, loader.batch_size)
    short = len(batch) < loader.batch_size and (loader.drop_last or len(batch) < (loader.min_batch_size or 1))
    if not batch or short:
        epoch.pos = len(epoch.order)
        raise Exhausted("Iterator exhausted")
    epoch.pos = pos
    loader.consumed += len(batch)
    return batch


def take(epoch: Epoch, size: int) -> tuple[list[Row], int]:
    """Up to `size` rows from the epoch's position; rows a LazyDataset drops are passed over."""
    batch, pos = [], epoch.pos
    while len(batch) < size and pos < len(epoch.order):
        idx = epoch.order[pos]
        pos += 1
        row = read_row(epoch.tokenizer, epoch.deferred, epoch.rows[idx], f"dataset[{idx}]")
        if row:
            batch.append(row)
    return batch, pos


async def loader_len(ctx: Ctx, kw: dict[str, Any]) -> int:
    """Batches per epoch."""
    no_more(kw, "__len__")
    loader = _loader(ctx)
    n = len(STORE.find(ctx.tenant_id, ctx.session_id, loader.dataset, "dataset").obj.view())
    return n // loader.batch_size if loader.drop_last else -(-n // loader.batch_size)


async def get_state(ctx: Ctx, kw: dict[str, Any]) -> dict[str, int]:
    no_more(kw, "get_state")
    return {"consumed_train_samples": _loader(ctx).consumed}


async def skip_consumed(ctx: Ctx, kw: dict[str, Any], ignored: frozenset[str] = frozenset()) -> None:
    """The next epoch begins after `consumed_train_samples` served rows (get_state's count)."""
    n = kw.pop("consumed_train_samples", None)
    if n is not None and (not isinstance(n, int) or isinstance(n, bool)):
        raise InvalidRequest("an integer (get_state's consumed_train_samples)", field="consumed_train_samples")
    no_more(kw, "skip_consumed_samples", ignored)
    if n is None or n <= 0:
        return  # Twinkle's: nothing to skip
    loader = _loader(ctx)
    loader.skip, loader.consumed, loader.epoch = n, n, None


async def resume(ctx: Ctx, kw: dict[str, Any]) -> None:
    """Twinkle's resume_from_checkpoint: skip_consumed_samples (its other arguments change nothing)."""
    await skip_consumed(ctx, kw, ignored=frozenset(kw) - {"consumed_train_samples"})


async def set_processor(ctx: Ctx, kw: dict[str, Any]) -> None:
    """Checked and kept; batches stay lists of InputFeatures, which the model pads."""
    cls = kw.pop("processor_cls", None)
    if isinstance(cls, str) and cls.startswith(PID):
        if STORE.find(ctx.tenant_id, ctx.session_id, cls, "processor_cls").kind != "InputProcessor":
            raise InvalidRequest("is not an InputProcessor", field="processor_cls")
    elif cls != "InputProcessor":
        raise InvalidRequest(f"unknown {cls!r}; allowed: InputProcessor", field="processor_cls")
    _loader(ctx).padding = padding_options(kw)


# ----- InputProcessor ------------------------------------------------------------------------------
def padding_options(kw: dict[str, Any]) -> dict[str, Any]:
    """InputProcessor's options, checked; padding and collation are the model's business here."""
    if kw.pop("device_mesh", None) is not None:
        raise InvalidRequest("is not used here: send none", field="device_mesh")
    side = pop_str(kw, "padding_side", "right")
    if side not in ("left", "right"):
        raise InvalidRequest("'left' or 'right'", field="padding_side")
    if pop_str(kw, "framework", "transformers") != "transformers":
        raise InvalidRequest("this server trains with 'transformers'", field="framework")
    options = {"padding_side": side, "padding_free": pop_bool(kw, "padding_free", False)}
    no_more(kw, "InputProcessor")
    return options


async def new_processor(ctx: Ctx, kw: dict[str, Any]) -> ProcessorObj:
    return ProcessorObj(padding_options(kw))


# ----- the tables ----------------------------------------------------------------------------------
Method = Callable[[Ctx, dict[str, Any]], Awaitable[Any]]
MAKERS: dict[str, Callable[[Ctx, dict[str, Any]], Awaitable[Any]]] = {
    "Dataset": lambda ctx, kw: new_dataset(ctx, kw, lazy=False),
    "LazyDataset": lambda ctx, kw: new_dataset(ctx, kw, lazy=True),
    "DataLoader": new_loader,
    "InputProcessor": new_processor,
}
DATASET_METHODS: dict[str, Method] = {
    "set_template": set_template, "encode": encode, "check": check, "map": map_rows, "filter": filter_rows,
    "add_dataset": add_dataset, "mix_dataset": mix_dataset, "__getitem__": get_item, "__len__": length,
    "flush_save": flush_save,
}
METHODS: dict[str, dict[str, Method]] = {
    "Dataset": DATASET_METHODS,
    "LazyDataset": DATASET_METHODS,
    "DataLoader": {"__iter__": loader_iter, "__next__": loader_next, "__len__": loader_len, "get_state": get_state,
                   "skip_consumed_samples": skip_consumed, "resume_from_checkpoint": resume,
                   "set_processor": set_processor},
    "InputProcessor": {},
}
REFUSED = {
    "save_as": "this server writes nothing to its disk for a client (no server paths): read the rows back with "
               "__getitem__ or a DataLoader",
    "cast_column": "image and audio columns are not supported: this server's base models are text-only",
    "pack_dataset": "sequence packing is not offered",
    "__call__": "padding and collation are the model's business here: send the InputFeatures to forward_backward "
                "as they are",
}
