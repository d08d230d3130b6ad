"""The networks and what builds them: the refiner (config, model, guidance, UNet parts, codecs, label embedding, image
branch, encoders, REPA), the coarse model, the shipped-model registry (zoo), devices and sliding-window tiling."""
