"""Training: loop, estimates, scaling laws."""
