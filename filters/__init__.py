"""Caption and image filters for curation, as pure functions over strings and arrays.

Modules (import the one you need; importing this package loads nothing heavy):

- ``filters.config``: ``CurateConfig`` (frozen dataclass of every threshold) and its presets.
- ``filters.reasons``: the drop/reject reason vocabulary shared by filters, job and report.
- ``filters.captions``: decoding, Unicode normalisation, word/CLIP-token length, safety and size rules.
- ``filters.clip_embed``: open_clip models (local weights or random), text/image embeddings, CLIP score.
- ``filters.aesthetic``: the LAION aesthetic predictor v2 (MLP on CLIP ViT-L/14 image embeddings).
- ``filters.semdedup``: SemDeDup (k-means with faiss, per-cluster duplicate groups).
- ``filters.image_scores``: the scores of generated images (embedding, aesthetic, CLIP score) for the dump.

The Beam job that strings them together is ``pipelines/curate/``; the filter job (``pipelines/filter/``) reuses the scoring and dedup parts.
"""
