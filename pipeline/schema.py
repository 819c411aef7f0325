"""The one record schema: a sample plus every stage's results, written to Parquet with this explicit pyarrow schema.

Every shard of every stage is written with ``RECORD_SCHEMA``; nothing is ever inferred. A record is handled in Python as
a plain ``dict`` whose keys are the top-level fields below; ``records_to_table`` / ``table_to_records`` convert.

Evolving the schema (the rule):
  * ``SCHEMA_VERSION`` is ``MAJOR.MINOR``.
  * Adding a *nullable* field (top-level or inside a struct) is a MINOR bump: old shards are read by filling the new
    field with null (``conform_table``), so no recomputation is needed.
  * Removing or renaming a field, or changing a type, is a MAJOR bump. A reader refuses shards of another MAJOR with a
    message telling the user to rerun the stage (stage keys include the major version, so a rerun writes fresh shards).
  * Every change is recorded in docs/schema.md with the version.
"""

from __future__ import annotations

from typing import Any, Iterable

import pyarrow as pa

SCHEMA_VERSION = "1.1"
SCHEMA_MAJOR = int(SCHEMA_VERSION.split(".")[0])

# A box is (x1, y1, x2, y2): top-left and bottom-right corners in pixels of the ORIGINAL image.
BOX = pa.list_(pa.float32(), 4)

IMAGE = pa.struct(
    [
        ("path", pa.string()),  # local file path, when the image is on disk
        ("uri", pa.string()),  # where it came from (URL, package resource, corpus key)
        ("sha256", pa.string()),  # content hash of the file bytes, null when the image was never read
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)

ENTITY = pa.struct(
    [
        ("text", pa.string()),  # surface text: tokens[start:end] joined by one space
        ("start", pa.int32()),  # token span [start, end)
        ("end", pa.int32()),
        ("type", pa.string()),  # coarse type (PER/LOC/ORG/OTHER for Twitter-GMNER)
        ("fine_type", pa.string()),  # fine type when known (FMNERG, knowledge stage), else null
        ("boxes", pa.list_(BOX)),  # gold boxes; empty = not visible, but only when grounding_labels == "present"
    ]
)

# --- stage column groups --------------------------------------------------------------------------------------------

RETRIEVAL = pa.struct(
    [
        ("query", pa.string()),
        ("source", pa.string()),  # "local_corpus" | "web_api"
        ("candidates", pa.list_(pa.struct([("uri", pa.string()), ("sha256", pa.string()), ("score", pa.float32())]))),
        ("chosen_score", pa.float32()),
        ("alpha", pa.float32()),
        ("model_id", pa.string()),
    ]
)

DETECTION = pa.struct([("label", pa.string()), ("score", pa.float32()), ("box", BOX)])
DETECTIONS = pa.struct(
    [
        ("model_id", pa.string()),
        ("backend", pa.string()),  # "mmdet" | "onnxruntime"
        ("boxes", pa.list_(DETECTION)),  # top-K by score, original pixels
        ("annotation_text", pa.string()),  # the `class: [x1,y1,x2,y2]` list given to prompts
    ]
)

KNOWLEDGE_ANSWER = pa.struct(  # one generator's raw answer about an entity
    [
        ("model_id", pa.string()),
        ("text", pa.string()),
        ("role", pa.string()),  # 1.1: the generator role that answered
        ("fine_type", pa.string()),  # 1.1: the fine type it proposed, as written
        ("ok", pa.bool_()),  # 1.1: it answered and the answer was read
        ("error", pa.string()),  # 1.1: why not
    ]
)
KNOWLEDGE_ASPECT = pa.struct(  # 1.1: one aspect the voter kept, with the generator roles that stated it
    [("aspect", pa.string()), ("text", pa.string()), ("support", pa.list_(pa.string()))]
)
KNOWLEDGE_TOKENS = pa.struct(  # 1.1: one LLM call made for an entity
    [("role", pa.string()), ("model_id", pa.string()), ("prompt_tokens", pa.int64()),
     ("completion_tokens", pa.int64()), ("cached", pa.bool_())]
)
KNOWLEDGE_ITEM = pa.struct(
    [
        ("entity", pa.string()),
        ("type", pa.string()),
        ("fine_type", pa.string()),  # validated against the ontology; null when no valid one was proposed
        ("knowledge", pa.string()),  # summarised, voted visual knowledge
        ("answers", pa.list_(KNOWLEDGE_ANSWER)),  # raw per-LLM answers
        ("voted", pa.string()),  # the voter's merged text, before the summary
        ("cache_key", pa.string()),  # entity text + type + model set + templates + settings
        ("entity_source", pa.string()),  # 1.1: "gold" | "predicted" (student.has_gold_knowledge reads it)
        ("status", pa.string()),  # 1.1: "ok" | "no_agreement" | "skipped" | "error"
        ("aspects", pa.list_(KNOWLEDGE_ASPECT)),  # 1.1: the voted aspects with their support
        ("fine_type_support", pa.list_(pa.string())),  # 1.1: generator roles that proposed the chosen fine type
        ("context_id", pa.string()),  # 1.1: the record whose sentence was the context (null: sentence-free prompt)
        ("tokens", pa.list_(KNOWLEDGE_TOKENS)),  # 1.1: tokens per call (generators, voter, summary)
        ("notes", pa.list_(pa.string())),  # 1.1: what was tolerated or rejected (invalid fine type, ...)
    ]
)

COT_CHAIN = pa.struct(
    [
        ("style", pa.string()),  # "template" | "llm" | "mllm"
        ("route", pa.string()),  # which step order / prompt route produced it
        ("model_id", pa.string()),  # null for templates
        ("seed", pa.int64()),
        ("think", pa.string()),
        ("answer", pa.string()),  # the E2E-GMNER answer string (without tags)
        ("text", pa.string()),  # the full assistant turn: <think>...</think><answer>...</answer>
        ("consistent", pa.bool_()),  # parsed answer equals gold under the evaluation rules
        ("rejection", pa.string()),  # why it was rejected, when not consistent
        ("attempts", pa.int32()),
        # 1.1 (distill): which teacher version wrote it and what it cost; null in older shards and for templates
        ("style_key", pa.string()),  # hash of the style's config and teacher (gmner-pipeline teachers groups by it)
        ("prompt_tokens", pa.int64()),  # its share of its requests' tokens, every attempt included
        ("completion_tokens", pa.int64()),
        ("seconds", pa.float32()),  # its share of its requests' latency (queueing included)
        ("frame", pa.string()),  # the teacher's coordinate frame kind; boxes are stored in original pixels anyway
        ("heldout", pa.bool_()),  # true: written for a dev/test record on request (heldout_chains); never training data
    ]
)

COT = pa.struct(
    [
        ("chains", pa.list_(COT_CHAIN)),
        ("split", pa.string()),  # "D1" (SFT) | "D2" (GRPO) | null
        ("skipped", pa.string()),  # why no chain was produced (e.g. "grounding_absent"), else null
    ]
)

GRPO = pa.struct(
    [
        ("policy_id", pa.string()),
        ("responses", pa.list_(pa.string())),
        ("rewards", pa.list_(pa.float32())),
        ("mean", pa.float32()),
        ("std", pa.float32()),
        ("max", pa.float32()),
        ("median", pa.float32()),
        ("keep", pa.bool_()),
        ("reason", pa.string()),  # the first rule that dropped the item, else null
    ]
)

LINEAGE_ENTRY = pa.struct(
    [
        ("stage", pa.string()),
        ("stage_version", pa.string()),
        ("stage_key", pa.string()),  # hash of input key + this stage's config + version
        ("config_hash", pa.string()),
        ("run_id", pa.string()),
        ("model_ids", pa.list_(pa.string())),
        ("prompt_hash", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("seconds", pa.float32()),
    ]
)

RECORD_FIELDS: list[pa.Field] = [
    pa.field("id", pa.string(), nullable=False),  # stable: derived from source + sample key (records.make_id)
    pa.field("source", pa.string(), nullable=False),  # e.g. "twitter-gmner-v2", "conll:fewnerd"
    pa.field("split", pa.string()),
    pa.field("sample_key", pa.string()),  # the id inside the source (IMGID, sentence index)
    pa.field("text", pa.string()),
    pa.field("tokens", pa.list_(pa.string())),
    pa.field("image", IMAGE),
    # "present" | "absent": absent means boxes are UNKNOWN, not "not visible"
    pa.field("grounding_labels", pa.string()),
    pa.field("entities", pa.list_(ENTITY)),
    pa.field("retrieval", RETRIEVAL),
    pa.field("detections", DETECTIONS),
    pa.field("knowledge", pa.list_(KNOWLEDGE_ITEM)),
    pa.field("cot", COT),
    pa.field("grpo", GRPO),
    pa.field("status", pa.string(), nullable=False),  # "ok" | "dropped" | "error"
    pa.field("drop_reason", pa.string()),  # when dropped: a short machine-readable reason ("below_alpha", ...)
    pa.field("error", pa.string()),  # when error: a message for a human (file, line, what to do)
    pa.field("error_stage", pa.string()),
    # when error: "transient" (a dead endpoint, a timeout storm, an OOM: a rerun redoes it) or "permanent" (bad input,
    # a request the model refuses); null in shards written before 1.1 (read as permanent)
    pa.field("error_kind", pa.string()),
    pa.field("lineage", pa.list_(LINEAGE_ENTRY)),
]

RECORD_SCHEMA = pa.schema(RECORD_FIELDS, metadata={b"gmner_pipeline.schema_version": SCHEMA_VERSION.encode()})
FIELD_NAMES = tuple(f.name for f in RECORD_FIELDS)

# Column groups: what stages declare they read and write (Stage.reads / Stage.writes), so that the plan can refuse an
# order that cannot work before anything runs. The sample's own fields (id, text, tokens, entities, ...) are always
# there; "image" is there when the source has images (a source's ``provides()``) or a stage wrote it (retrieve).
COLUMN_GROUPS: dict[str, tuple[str, ...]] = {
    "image": ("image",),
    "retrieval": ("retrieval",),
    "detections": ("detections",),
    "knowledge": ("knowledge",),
    "cot": ("cot",),
    "grpo": ("grpo",),
}

STATUS_OK, STATUS_DROPPED, STATUS_ERROR = "ok", "dropped", "error"
ERROR_TRANSIENT, ERROR_PERMANENT = "transient", "permanent"
GROUNDING_PRESENT, GROUNDING_ABSENT = "present", "absent"


class SchemaMismatch(RuntimeError):
    pass


def empty_record(**fields: Any) -> dict[str, Any]:
    """A record with every field present (null / empty) and ``status='ok'``, updated with ``fields``."""
    unknown = set(fields) - set(FIELD_NAMES)
    if unknown:
        raise KeyError(f"unknown record field(s) {sorted(unknown)}; the schema has {list(FIELD_NAMES)}")
    rec: dict[str, Any] = {name: None for name in FIELD_NAMES}
    rec.update(entities=[], tokens=[], lineage=[], status=STATUS_OK)
    rec.update(fields)
    return rec


def records_to_table(records: Iterable[dict[str, Any]]) -> pa.Table:
    """Records -> table with exactly RECORD_SCHEMA (raises on a field the schema does not have)."""
    records = list(records)
    for rec in records:
        extra = set(rec) - set(FIELD_NAMES)
        if extra:
            raise KeyError(f"record {rec.get('id')!r} has field(s) {sorted(extra)} that are not in the schema")
    return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)


def table_to_records(table: pa.Table) -> list[dict[str, Any]]:
    return conform_table(table).to_pylist()


VERSION_KEY = b"gmner_pipeline.schema_version"
# Columns a DataFrame library adds on its own (pandas writes a non-default index as __index_level_N__).
_FOREIGN_COLUMN_PREFIXES = ("__index_level_",)


def conform_table(table: pa.Table, columns: list[str] | None = None) -> pa.Table:
    """Bring a table to RECORD_SCHEMA (with ``columns``: to those fields of it, in that order): one written with an
    older MINOR version (new nullable fields as null), or one that lost the version metadata on the way through
    another tool (Ray Data, pandas, DuckDB, polars write their own schema: wider integers, large strings, variable
    lists, another column order), when its columns conform."""
    meta = table.schema.metadata or {}
    if VERSION_KEY in meta:
        version = meta[VERSION_KEY].decode()
        if int(version.split(".")[0]) != SCHEMA_MAJOR:
            raise SchemaMismatch(
                f"shard written with record schema {version}, this gmner-pipeline reads {SCHEMA_VERSION}; "
                "rerun the stage that wrote it (its output key changes with the schema major version)"
            )
    else:
        problem = _columns_problem(table.schema, columns)
        if problem:
            raise SchemaMismatch(f"table carries no gmner_pipeline schema version and does not look like a record "
                                 f"table ({problem}); records need the columns of record schema {SCHEMA_VERSION} "
                                 "(docs/schema.md): keep them when you post-process shards")
    target = RECORD_SCHEMA if columns is None else pa.schema([RECORD_SCHEMA.field(c) for c in columns],
                                                             metadata=RECORD_SCHEMA.metadata)
    if table.schema.equals(target, check_metadata=False):
        return table.replace_schema_metadata(RECORD_SCHEMA.metadata)
    arrays = []
    for field in target:
        if field.name in table.column_names:
            try:
                arrays.append(table.column(field.name).cast(field.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise SchemaMismatch(f"column {field.name!r} has type {table.schema.field(field.name).type}, which "
                                     f"does not convert to the record schema's {field.type}: {exc}") from None
        else:
            arrays.append(pa.nulls(table.num_rows, type=field.type))
    try:
        return pa.Table.from_arrays(arrays, schema=target)
    except pa.ArrowInvalid as exc:  # a null in a required column
        raise SchemaMismatch(f"table does not fit record schema {SCHEMA_VERSION}: {exc}") from None


def _columns_problem(schema: pa.Schema, columns: list[str] | None = None) -> str | None:
    """Why a table without version metadata is not a record table (unknown columns, or required ones missing among
    those asked for), or None."""
    names = [n for n in schema.names if not n.startswith(_FOREIGN_COLUMN_PREFIXES)]
    unknown = sorted(set(names) - set(FIELD_NAMES))
    wanted = set(FIELD_NAMES if columns is None else columns)
    missing = [f.name for f in RECORD_FIELDS if not f.nullable and f.name in wanted and f.name not in names]
    parts = []
    if unknown:
        parts.append(f"columns not in the schema: {unknown}")
    if missing:
        parts.append(f"required columns missing: {missing}")
    return "; ".join(parts) or None
