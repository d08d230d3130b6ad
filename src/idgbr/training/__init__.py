"""Training: the refiner's objective, batches, checkpoints and loop, and the coarse stage (train-coarse, predict-coarse)."""
