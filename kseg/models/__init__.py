"""Model builders, one module per family; importing this package registers them all."""

from kseg.models import alexnet, lenet, resnet, vgg  # noqa: F401
