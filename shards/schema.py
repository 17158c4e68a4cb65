"""The two dataset files beside the shards, as dataclasses: ``dataset.json`` (``DatasetInfo``) and
each shard's index ``NNNNNN.json`` (``ShardIndex``). This module is the only code that reads or
writes them; the sample record itself is ``shards.record``.

    info = read_dataset_info(root)                 # validated; UserError names the file and field
    info.dump_recipe.sampler.num_inference_steps   # the recipe typed (shards.recipe); info.recipe: its JSON
    write_dataset_info(root, info)                 # atomic, through core.fs
    index = ShardIndex.read(root, 3)               # NNNNNN.json of shard 3
    index.member_checksums("p0-s1")                # {ext: crc32} of one sample's members

Both keep fields this version does not know in ``extra`` and write them back, so a file written by a
newer writer round-trips. A file whose ``schema_version`` is not in
``shards.record.SUPPORTED_SCHEMA_VERSIONS`` is a ``UserError`` naming the file, the version found
and the versions supported.
"""

from __future__ import annotations

import dataclasses
import functools
import json

from core.errors import UserError
from core.fs import atomic_write_bytes, atomic_write_json, join, read_bytes
from shards.recipe import DumpRecipe
from shards.record import CHECKSUM_ALGORITHM, SCHEMA_VERSION, SUPPORTED_SCHEMA_VERSIONS, noise_process

DATASET_JSON = "dataset.json"


def index_name(shard: int) -> str:
    return f"{shard:06d}.json"


def check_schema_version(version, source: str) -> int:
    """``version`` if this code reads it, else a one-line ``UserError`` naming ``source``."""
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise UserError(f"{source} has schema_version {version!r}; this version of diffusion-distill reads "
                        f"{', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))} (re-make the dataset or use the "
                        "version that wrote it)")
    return version


def check_recipe_hash(found: str | None, expected: str, source: str) -> None:
    """One-line ``UserError`` unless ``source`` was made with recipe ``expected``."""
    if found != expected:
        raise UserError(f"{source} was made with recipe {found!r}, expected {expected!r}: "
                        "use a new output folder, or the recipe that made it")


def _check(source: str, name: str, value, types, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, types) or (isinstance(value, bool) and types is int):  # bool is an int subclass
        raise UserError(f"{source}: field {name!r} is {type(value).__name__} {str(value)[:60]!r}, "
                        f"expected {getattr(types, '__name__', types)}")


def _split(cls, d: dict, source: str) -> dict:
    if not isinstance(d, dict):
        raise UserError(f"{source} is not a JSON object")
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    missing = [f.name for f in dataclasses.fields(cls) if f.name in names and f.name not in d
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"{source}: required field {missing[0]!r} missing")
    kwargs = {k: v for k, v in d.items() if k in names}
    kwargs["extra"] = {k: v for k, v in d.items() if k not in names}
    return kwargs


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    """``dataset.json``: written last by the dump and the filter job; its presence marks completion."""

    schema_version: int  # of the records (shards.record.SCHEMA_VERSION when written)
    recipe: dict  # the dump recipe (what the samples are); filtered datasets keep their dump's
    recipe_hash: str  # hash of ``recipe``: every shard index carries it too
    shards: list  # [{"shard": "NNNNNN.tar", "count", "bytes", "sha256"}], complete shards in order
    totals: dict = dataclasses.field(default_factory=dict)  # counts of the job that wrote it
    shared: dict = dataclasses.field(default_factory=dict)  # name -> file of arrays stored once (negative embeds)
    timesteps: list | None = None  # all S teacher timesteps (exact floats from schema 2)
    recorded_steps: list | None = None  # step indices recorded in every sample
    scheduler_class: str | None = None  # diffusers class the dump sampled with
    scheduler_config: dict | None = None  # its config (the noise schedule)
    prediction_type: str | None = None  # "epsilon" or "v_prediction"
    rejects_by_reason: dict | None = None  # dump only: reason -> count
    lineage: dict | None = None  # filter only: filter recipe and parent, nested back to the dump
    extra: dict = dataclasses.field(default_factory=dict)  # fields this version does not know, kept

    def __post_init__(self) -> None:
        self.validate(DATASET_JSON)

    def validate(self, source: str) -> None:
        check_schema_version(self.schema_version, source)
        _check(source, "recipe", self.recipe, dict)
        _check(source, "recipe_hash", self.recipe_hash, str)
        _check(source, "shards", self.shards, list)
        for i, entry in enumerate(self.shards):
            if not isinstance(entry, dict) or not isinstance(entry.get("shard"), str) or not isinstance(entry.get("count"), int):
                raise UserError(f"{source}: field 'shards' entry {i} is {str(entry)[:60]!r}, expected "
                                "{'shard': 'NNNNNN.tar', 'count': int, ...}")
        for name in ("totals", "shared"):
            _check(source, name, getattr(self, name), dict)
        for name in ("timesteps", "recorded_steps"):
            _check(source, name, getattr(self, name), list, optional=True)
        for name in ("scheduler_config", "rejects_by_reason", "lineage"):
            _check(source, name, getattr(self, name), dict, optional=True)
        for name in ("scheduler_class", "prediction_type"):
            _check(source, name, getattr(self, name), str, optional=True)

    @classmethod
    def from_dict(cls, d: dict, source: str = DATASET_JSON) -> "DatasetInfo":
        kwargs = _split(cls, d, source)
        check_schema_version(kwargs.get("schema_version"), source)  # first: a newer file may differ in anything
        try:
            return cls(**kwargs)
        except UserError as err:
            raise UserError(str(err).replace(DATASET_JSON, source, 1)) from None

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d = {k: v for k, v in d.items() if v is not None or k in ("timesteps", "recorded_steps", "scheduler_class",
                                                                  "scheduler_config", "prediction_type")}
        return {**self.extra, **d}

    @property
    def shard_names(self) -> list[str]:
        return [s["shard"] for s in self.shards]

    @functools.cached_property
    def dump_recipe(self) -> DumpRecipe:
        """``recipe`` typed (``shards.recipe.DumpRecipe``: the sampler's settings in ``.sampler``); ``recipe``
        itself stays the JSON as recorded, so its hash and what the filter copies are unchanged."""
        return DumpRecipe.from_json(self.recipe, source=f"{DATASET_JSON} recipe")

    @property
    def noise_process(self) -> str:
        """How the dump's latents mix x0 and eps (``shards.record.noise_process`` of this file)."""
        return noise_process(self.to_dict())


def read_dataset_info(root: str) -> DatasetInfo:
    """``root/dataset.json``, validated. ``UserError`` naming the path when missing or invalid."""
    path = join(root, DATASET_JSON)
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        raise UserError(f"{path} missing: {root!r} is not a finished dataset (re-run the job that writes it)") from None
    try:
        d = json.loads(data)
    except ValueError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    return DatasetInfo.from_dict(d, source=path)


DATASET_CARD = "README.md"


def dataset_card(info: DatasetInfo) -> str:
    """A dataset card (the Hub's YAML metadata, then what the shards hold): ``configs``/``data_files`` name the
    tars, so the Hub's viewer and ``datasets.load_dataset("webdataset", ...)`` find them. The recipe is read
    typed (``info.dump_recipe``): a sampler field the recipe lacks reads as ``SamplerConfig``'s default."""
    recipe = info.dump_recipe
    sampler = recipe.sampler
    total = sum(int(s.get("count", 0)) for s in info.shards)
    kind = "filtered teacher dump" if info.lineage else "teacher dump"
    lines = ["---", "configs:", "- config_name: default", "  data_files:", "  - split: train", '    path: "*.tar"',
             "task_categories:", "- text-to-image", "tags:", "- webdataset", "- diffusion-distillation",
             f"- {sampler.scheduler or 'ddim'}", "---", "",
             f"# {kind.capitalize()}: {recipe.teacher or '?'}", "",
             f"{total} samples in {len(info.shards)} WebDataset shards (`NNNNNN.tar`, each with its index `NNNNNN.json`), "
             f"schema version {info.schema_version}, recipe hash `{info.recipe_hash}`.", "",
             f"- teacher: `{recipe.teacher}`, {sampler.num_inference_steps} steps of "
             f"`{info.scheduler_class}` ({info.prediction_type}), guidance "
             f"{sampler.guidance_range or sampler.guidance_scale}",
             f"- recorded steps: {len(info.recorded_steps or [])}; block outputs: "
             f"{', '.join(sampler.feature_layers or []) or 'none'}",
             "", "The members of a sample and their shapes are described by the project's `shards/record.py`; "
             "`dataset.json` holds the whole recipe. Read with `webdataset` or `tar`.", ""]
    return "\n".join(lines)


def write_dataset_info(root: str, info: DatasetInfo | dict) -> DatasetInfo:
    """Validate and write ``root/dataset.json`` atomically, after its dataset card ``README.md`` (dataset.json
    marks the folder complete, so it goes last); returns what was written."""
    if isinstance(info, dict):
        info = DatasetInfo.from_dict(info, source=join(root, DATASET_JSON))
    atomic_write_bytes(join(root, DATASET_CARD), dataset_card(info).encode("utf-8"))
    atomic_write_json(join(root, DATASET_JSON), info.to_dict())
    return info


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardIndex:
    """``NNNNNN.json``: written after its shard is complete, so "index present and matching" means
    "shard complete". Per-sample lists are aligned with ``keys``."""

    shard: str  # "NNNNNN.tar"
    count: int  # samples
    keys: list  # sample keys in tar order
    bytes: int  # tar size
    sha256: str  # of the whole tar
    schema_version: int
    recipe_hash: str
    offsets: list | None = None  # per key [start, end) of its members in the tar, headers included
    checksums: list | None = None  # per key {ext: checksum of the member's bytes} (None: written before them)
    checksum_algorithm: str | None = None  # "crc32" (shards.record.member_checksum)
    field_bytes: dict = dataclasses.field(default_factory=dict)  # member group -> bytes
    scores: dict | None = None  # scored shards: name -> per-key values
    embeddings: dict | None = None  # scored shards: the NNNNNN.emb.npy sidecar's file, shape, dtype, sha256
    extra: dict = dataclasses.field(default_factory=dict)  # job fields (rejects, timesteps, ...), kept

    def __post_init__(self) -> None:
        self.validate(self.shard.replace(".tar", ".json") if isinstance(self.shard, str) else "shard index")

    def validate(self, source: str) -> None:
        check_schema_version(self.schema_version, source)
        _check(source, "shard", self.shard, str)
        _check(source, "count", self.count, int)
        _check(source, "keys", self.keys, list)
        _check(source, "bytes", self.bytes, int)
        _check(source, "sha256", self.sha256, str)
        _check(source, "recipe_hash", self.recipe_hash, str)
        if self.count != len(self.keys):
            raise UserError(f"{source}: field 'count' is {self.count} but 'keys' lists {len(self.keys)}")
        for name in ("offsets", "checksums"):
            value = getattr(self, name)
            _check(source, name, value, list, optional=True)
            if value is not None and len(value) != self.count:
                raise UserError(f"{source}: field {name!r} has {len(value)} entries for {self.count} keys")
        if self.checksums is not None and self.checksum_algorithm != CHECKSUM_ALGORITHM:
            raise UserError(f"{source}: field 'checksum_algorithm' is {self.checksum_algorithm!r}, "
                            f"this version checks {CHECKSUM_ALGORITHM!r}")
        for name, value in (self.scores or {}).items():
            if len(value) != self.count:
                raise UserError(f"{source}: field 'scores.{name}' has {len(value)} entries for {self.count} keys")

    @classmethod
    def from_dict(cls, d: dict, source: str = "shard index") -> "ShardIndex":
        kwargs = _split(cls, d, source)
        check_schema_version(kwargs.get("schema_version"), source)
        try:
            return cls(**kwargs)
        except UserError as err:
            raise UserError(str(err).replace(str(kwargs.get("shard", "")).replace(".tar", ".json"), source, 1)) from None

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d = {k: v for k, v in d.items() if v is not None}
        return {**self.extra, **d}

    def member_checksums(self, key: str) -> dict | None:
        """``{ext: checksum}`` of sample ``key`` (``None`` for an index written before checksums, or
        a key it does not list)."""
        return self.checksums_by_key.get(key) if self.checksums is not None else None

    @functools.cached_property
    def checksums_by_key(self) -> dict:
        """``{key: {ext: checksum}}`` (empty for an index written before checksums)."""
        return dict(zip(self.keys, self.checksums)) if self.checksums is not None else {}

    @classmethod
    def read(cls, root: str, shard: int) -> "ShardIndex":
        """``root/NNNNNN.json``, validated. ``FileNotFoundError`` when absent (an incomplete shard);
        ``UserError`` naming the file when unreadable or invalid."""
        path = join(root, index_name(shard))
        data = read_bytes(path)
        try:
            d = json.loads(data)
        except ValueError as err:
            raise UserError(f"{path} is not valid JSON: {err}") from None
        return cls.from_dict(d, source=path)

    def write(self, root: str, shard: int) -> None:
        """Write ``root/NNNNNN.json`` atomically (after the shard itself)."""
        atomic_write_json(join(root, index_name(shard)), self.to_dict())


def new_index_fields() -> dict:
    """What a writer of this version puts in every index (the schema version and checksum algorithm)."""
    return {"schema_version": SCHEMA_VERSION, "checksum_algorithm": CHECKSUM_ALGORITHM}


def shard_name(index: int) -> str:
    return f"{index:06d}.tar"


def embeds_name(index: int) -> str:
    return f"{index:06d}.emb.npy"
