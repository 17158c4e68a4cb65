"""Evaluation: teacher and student at several step counts on the same captions and seeds (``evaluate``;
``distill eval``), the metrics (``metrics``) and the report (``report``)."""
