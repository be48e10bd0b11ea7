"""Offline datasets (Fashion-MNIST, MNIST, digits, CIFAR-10 folders, Shakespeare) and a small
model zoo (MLP, LeNet-5, a small ResNet, a small MobileNetV2, a tiny character-level GPT).

Nothing is loaded at import; every loader reads its files when called.
"""

from lowbit.data.batching import batches, calibration_batches
from lowbit.data.cifar import CIFAR10_MEAN, CIFAR10_STD, load_cifar10
from lowbit.data.datasets import (
    DIGITS_MEAN,
    DIGITS_STD,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_ROOT,
    FASHION_MNIST_STD,
    MNIST_MEAN,
    MNIST_STD,
    DatasetNotFoundError,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    normalize_images,
)
from lowbit.data.gpt import (
    GPT_RECIPE,
    GPTRecipe,
    TinyGPT,
    perplexity,
    pretrained_tiny_gpt,
    text_calibration_batches,
)
from lowbit.data.idx import IDXFormatError, parse_idx, read_idx, write_idx
from lowbit.data.mobilenet import (
    MOBILENET_FASHION_RECIPE,
    MobileNetRecipe,
    pretrained_mobilenet_fashion_mnist,
)
from lowbit.data.safe_pickle import RestrictedUnpickler, UnsafePickleError, safe_load, safe_loads
from lowbit.data.text import load_shakespeare
from lowbit.data.training import (
    FASHION_RESNET_RECIPE,
    TrainRecipe,
    default_cache_dir,
    evaluate,
    load_weights,
    pretrained_resnet_fashion_mnist,
    save_weights,
    train,
)
from lowbit.data.zoo import (
    MLP,
    MODELS,
    BasicBlock,
    InvertedResidual,
    LeNet5,
    MobileNetV2Small,
    SmallResNet,
    create_model,
)

__all__ = [
    "GPT_RECIPE",
    "GPTRecipe",
    "InvertedResidual",
    "MOBILENET_FASHION_RECIPE",
    "MobileNetRecipe",
    "MobileNetV2Small",
    "TinyGPT",
    "load_shakespeare",
    "perplexity",
    "pretrained_mobilenet_fashion_mnist",
    "pretrained_tiny_gpt",
    "text_calibration_batches",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_ROOT",
    "FASHION_MNIST_STD",
    "FASHION_RESNET_RECIPE",
    "MLP",
    "MNIST_MEAN",
    "MNIST_STD",
    "MODELS",
    "BasicBlock",
    "DatasetNotFoundError",
    "IDXFormatError",
    "LeNet5",
    "RestrictedUnpickler",
    "SmallResNet",
    "TrainRecipe",
    "UnsafePickleError",
    "batches",
    "calibration_batches",
    "create_model",
    "default_cache_dir",
    "evaluate",
    "load_cifar10",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "load_weights",
    "normalize_images",
    "parse_idx",
    "pretrained_resnet_fashion_mnist",
    "read_idx",
    "safe_load",
    "safe_loads",
    "save_weights",
    "train",
    "write_idx",
]
