"""RunInference model handlers of the curate job: open_clip embeddings and the aesthetic MLP.

Models load in ``load_model()`` on the workers (never in ``__init__``), so the handlers pickle
as a few strings. Both take and return record dicts, one output per input, in order.
The launcher-side check of their weights is ``pipelines.scoring.check_models``.
"""

from __future__ import annotations

import io
from typing import Any, Iterable, Optional, Sequence

from apache_beam.ml.inference.base import ModelHandler
from apache_beam.metrics import Metrics


class ClipEmbeddingHandler(ModelHandler[dict, dict, Any]):
    """Adds ``text_embedding`` to every record, and ``image_embedding`` + ``clip_score`` to records
    carrying ``image_bytes`` (which it removes). Embeddings are L2-normalised float32."""

    def __init__(self, model_name: str, weights: str, device: str = "cpu", batch_size: int = 32):
        super().__init__(min_batch_size=1, max_batch_size=batch_size)
        self.model_name = model_name
        self.weights = weights
        self.device = device

    def load_model(self):
        from filters.clip_embed import load_clip

        return load_clip(self.model_name, self.weights, self.device)

    def run_inference(self, batch: Sequence[dict], model, inference_args: Optional[dict] = None) -> Iterable[dict]:
        from PIL import Image

        from filters.clip_embed import embed_images, embed_texts

        text_emb = embed_texts(model, [r["caption"] for r in batch])
        with_image = [i for i, r in enumerate(batch) if r.get("image_bytes")]
        images = [Image.open(io.BytesIO(batch[i]["image_bytes"])) for i in with_image]
        image_emb = dict(zip(with_image, embed_images(model, images)))
        Metrics.counter("curate", "clip_texts").inc(len(batch))
        Metrics.counter("curate", "clip_images").inc(len(with_image))
        out = []
        for i, record in enumerate(batch):
            record = {**record, "image_bytes": None, "text_embedding": text_emb[i]}
            if i in image_emb:
                record["image_embedding"] = image_emb[i]
                record["clip_score"] = float(image_emb[i] @ text_emb[i])  # both unit norm: cosine
            out.append(record)
        return out

    def get_num_bytes(self, batch: Sequence[dict]) -> int:
        return sum(len(r["caption"]) + len(r.get("image_bytes") or b"") for r in batch)

    def get_metrics_namespace(self) -> str:
        return "curate_clip"


class AestheticHandler(ModelHandler[dict, dict, Any]):
    """Adds ``aesthetic_score`` to records with an ``image_embedding``; others pass unchanged."""

    def __init__(self, weights: str, device: str = "cpu", batch_size: int = 256):
        super().__init__(min_batch_size=1, max_batch_size=batch_size)
        self.weights = weights
        self.device = device

    def load_model(self):
        from filters.aesthetic import load_aesthetic_mlp

        return load_aesthetic_mlp(self.weights, self.device)

    def run_inference(self, batch: Sequence[dict], model, inference_args: Optional[dict] = None) -> Iterable[dict]:
        import numpy as np

        from filters.aesthetic import aesthetic_scores

        idx = [i for i, r in enumerate(batch) if r.get("image_embedding") is not None]
        out = [dict(r) for r in batch]
        if idx:
            scores = aesthetic_scores(model, np.stack([batch[i]["image_embedding"] for i in idx]))
            for i, score in zip(idx, scores):
                out[i]["aesthetic_score"] = float(score)
        return out

    def get_num_bytes(self, batch: Sequence[dict]) -> int:
        return 4 * sum(len(r.get("image_embedding") if r.get("image_embedding") is not None else ()) for r in batch)

    def get_metrics_namespace(self) -> str:
        return "curate_aesthetic"
