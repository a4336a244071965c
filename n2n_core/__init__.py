"""n2n_core: a from-scratch neural-network framework on torch tensor operations.

Modules have explicit `forward` and `backward`; parameters carry their gradients;
nothing here uses PyTorch's module library (`torch.nn`, its functional part included),
its automatic differentiation or its optimizers (tests/test_source_rules.py enforces it).
"""
from n2n_core.module import Module, Parameter, Sequential

__all__ = ["Module", "Parameter", "Sequential"]
from n2n_core.losses import L1Loss, MSELoss
from n2n_core.optim import SGD, Adam
from n2n_core.metrics import psnr, quantize_8bit, ssim
from n2n_core.skip import Add, Concat
from n2n_core.upsample import NearestUpsample2x

__all__ += ["MSELoss", "L1Loss", "SGD", "Adam", "psnr", "ssim", "quantize_8bit", "Concat", "Add",
            "NearestUpsample2x"]
from n2n_core.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint

__all__ += ["Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint"]
from n2n_core.activation import LeakyReLU, ReLU, Sigmoid
from n2n_core.conv import Conv2d, ConvTranspose2d, Upsampling
from n2n_core.pooling import MaxPool2d

__all__ += ["Conv2d", "ConvTranspose2d", "Upsampling", "MaxPool2d", "ReLU", "LeakyReLU", "Sigmoid"]
from n2n_core.architectures import ARCHITECTURES, ModelConfig, build_model

__all__ += ["ARCHITECTURES", "ModelConfig", "build_model"]

from n2n_core.widen import widen_unet

__all__ += ["widen_unet"]
from n2n_core.average import average_models

__all__ += ["average_models"]
from n2n_core.workspace import Workspace

__all__ += ["Workspace"]
from n2n_core.neighbor import NeighborLoss, NeighborSubsampler, draw_pairs

__all__ += ["NeighborLoss", "NeighborSubsampler", "draw_pairs"]
