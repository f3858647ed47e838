"""Metrics: segmentation and error-map scores and the QI (jnp, `segmentation`), host-side
quality scores (predicted Dice, risk-coverage, AUROC, calibration, correlations; `quality`)
and conformal lower bounds (`conformal`)."""
