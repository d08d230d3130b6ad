"""Data on disk and in memory: raster I/O, the canonical dataset layout, converters, augmentation, synthetic data."""
