"""The ground floor: what every other package may import and that imports none of them.

    core.errors     UserError (one line, exit 2), run_main, the known-warning filters
    core.options    option() fields on frozen dataclasses, parse(), reuse()
    core.fs         every file and folder operation, local or fsspec (gs://, s3://, memory://)
    core.allocator  the glibc allocator state (steady | default) that timings and the curate job use
    core.progress   progress of long steps: units done of N with an ETA, records per stage, one line per item

Nothing heavy is imported here; nothing here parses arguments.
"""
