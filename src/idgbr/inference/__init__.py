"""Inference: the Refiner (tiles and folders), scenes by windows, archives on dask, post-processing."""
