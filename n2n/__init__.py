"""n2n's Python API: denoise arrays, images and tensors, or whole folders, from a notebook.

    from n2n import Denoiser
    denoiser = Denoiser.load("default")        # or a checkpoint path, or a URI
    clean = denoiser.denoise(noisy)            # numpy, PIL image or torch tensor: the same kind back
    denoiser.denoise_folder("noisy/", "clean/")  # the bulk job of `n2n denoise`

The command line (`n2n ...`) and this API call the same library code (`pipeline`).
"""
from n2n.denoiser import Denoiser

__all__ = ["Denoiser"]
