"""Scoring fused images: the field's metrics, folder scoring, the comparison report, curves."""
