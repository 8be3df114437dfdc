"""Networks: the model registry (``registry``: ConvNet, ResNet-18, timm, a tiny test CNN),
strict pretrained-weight loading (``pretrained``) and teacher training, evaluation and
checkpoint I/O (``teacher``)."""
