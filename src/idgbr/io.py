"""``idgbr.io``, the path the README and earlier releases use: the raster readers and writers of :mod:`idgbr.data.io`."""

from .data.io import (GEOTIFF_EXTS, IMAGE_EXTS, atomic_path, is_geotiff, read_image, read_label, write_array,
                      write_geotiff, write_image, write_label)

__all__ = ["GEOTIFF_EXTS", "IMAGE_EXTS", "atomic_path", "is_geotiff", "read_image", "read_label", "write_array",
           "write_geotiff", "write_image", "write_label"]
