"""Sample photos that ship with scikit-image: test and demo images that need no download."""
from __future__ import annotations

import numpy as np
from PIL import Image


def sample_photo(name: str, max_side: int) -> np.ndarray:
    """A scikit-image sample photo as (H, W, 3) uint8, scaled so its longer side <= max_side."""
    import skimage.data

    loader = getattr(skimage.data, name, None)
    if loader is None:
        raise ValueError(f"scikit-image has no sample photo {name!r}")
    array = loader()
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    image = Image.fromarray(array[..., :3])
    scale = max_side / max(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    return np.asarray(image)
