"""Teachers: loading Stable Diffusion teachers offline, the trajectory sampler with feature capture,
the sample record schema and shard I/O. Imports nothing heavy at import time.

    from teachers.load import load_teacher
    from teachers.sampler import SamplerConfig, SampleRequest, sample_trajectories
    from shards import record
"""
