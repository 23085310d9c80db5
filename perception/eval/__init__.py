"""Evaluation: the paper's metrics (G, C, mIoU, BF), evaluate() and perception-eval."""
