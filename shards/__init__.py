"""The shard format: one home for what the teacher dump writes and every reader reads.

    shards.record   the sample record: member names, encoding, noise levels, checksums (schema version)
    shards.recipe   the dump recipe (DumpRecipe, its sampler settings once: SamplerConfig) and its hash
    shards.schema   dataset.json (DatasetInfo, its typed recipe) and the shard index (ShardIndex); file names
    shards.writer   the deterministic, atomic tar writer (ShardWriter)
    shards.reader   indexes, embedding sidecars, ranged reads of samples
    shards.verify   verify_shard: size, sha256, member checksums, finiteness, shapes
    shards.loader   the student's loader: shards -> checked, decoded records (webdataset, split by rank/worker)
    shards.inspect  ``distill inspect DIR [--verify]``

Imports nothing heavy at import time.
"""
