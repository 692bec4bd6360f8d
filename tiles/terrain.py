"""Elevation tiles for MapLibre's ``raster-dem`` source: Mapbox terrain-RGB and Terrarium.

Both pack metres into the three 8-bit channels of a PNG (lossless; never WebP-lossy):
  mapbox:    h = -10000 + (R * 65536 + G * 256 + B) * 0.1   (0.1 m steps)
  terrarium: h = R * 256 + G + B / 256 - 32768              (1/256 m steps)
Pixels without data are encoded as 0 m, which is what MapLibre draws for missing terrain.
"""

from __future__ import annotations

import numpy as np
from rio_tiler.utils import render

from tiles.raster import raster_layer, read_tile
from twin.core.errors import InvalidParameter

ENCODINGS = ("mapbox", "terrarium")


def encode_mapbox(elevation: np.ndarray) -> np.ndarray:
    value = np.clip(np.round((elevation + 10000.0) * 10.0), 0, 256**3 - 1).astype(np.uint32)
    return np.stack([value >> 16, (value >> 8) & 0xFF, value & 0xFF]).astype(np.uint8)


def encode_terrarium(elevation: np.ndarray) -> np.ndarray:
    value = np.clip(np.round((elevation + 32768.0) * 256.0), 0, 256**3 - 1).astype(np.uint32)
    return np.stack([value >> 16, (value >> 8) & 0xFF, value & 0xFF]).astype(np.uint8)


def decode(rgb: np.ndarray, encoding: str) -> np.ndarray:
    """Metres from a (3, h, w) tile; the inverse of the encoders, for clients and tests."""
    r, g, b = (rgb[i].astype(np.float64) for i in range(3))
    if encoding == "mapbox":
        return -10000.0 + (r * 65536 + g * 256 + b) * 0.1
    return r * 256 + g + b / 256 - 32768.0


def terrain_tile(layer, z: int, x: int, y: int, encoding: str = "mapbox") -> bytes:
    """A PNG terrain tile of a single-band (DEM) raster layer."""
    if encoding not in ENCODINGS:
        raise InvalidParameter(f"encoding: expected one of {', '.join(ENCODINGS)}, "
                               f"got {encoding!r}")
    image = read_tile(raster_layer(layer), z, x, y)
    if image.count != 1:
        raise InvalidParameter(f"layer '{layer.id}' has {image.count} bands; terrain tiles "
                               "need a single-band elevation model")
    # rio-tiler always gives a full mask; getmaskarray returns that array as it is.
    nodata = np.ma.getmaskarray(image.array)[0]
    elevation = np.where(nodata, 0.0, image.array.data[0].astype(np.float64))
    encode = encode_mapbox if encoding == "mapbox" else encode_terrarium
    return render(encode(elevation), img_format="PNG")
