"""Statistics on predictions and labels, below training, evaluation and inference alike.

Metrics with patient-aware confidence intervals and tests, calibration (temperatures, conformal
thresholds), uncertainty summaries, operating points, referral. Arrays in, numbers out: nothing
here loads a run, a model or a dataset, so every layer above can use it.
"""
