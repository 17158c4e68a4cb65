"""Distillation maths: the losses (``losses``), the recipes that combine them (``recipes``), batches of
offline targets from shards (``batches``), the adversarial terms (``adversarial``), progressive
distillation's per-step maths (``progressive``) and the student's sampling schedule (``inference``)."""
