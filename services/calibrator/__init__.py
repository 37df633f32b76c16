"""The calibrator service: activation statistics from calibration data."""
