"""ImageNet normalisation: every image enters the networks as ``(rgb / 255 - mean) / std`` (docs/method.md §1.3)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
