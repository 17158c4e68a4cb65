"""What a student costs: parameters, MACs and latency of students and teachers (``profile``; ``distill
profile``) and the per-block latency lookup table that predicts a UNet's latency from its layout
(``lookup``; SnapFusion's Algorithm 1 uses it)."""
