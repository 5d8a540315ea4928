"""Client of the product-segmentor service, and its command-line video tool.

The base install (``pip install product-segmentor``): httpx, numpy, Pillow and pycocotools,
no torch and no Ray. ``segment-video`` needs the ``[video]`` extra (PyAV); running a model in
this process instead of a service needs ``[serve]``.
"""

from segmentation_client.client import (
    AsyncSegmentorClient,
    FrameError,
    Image,
    Instance,
    Product,
    Products,
    RetryPolicy,
    Segmentation,
    SegmentorClient,
    ServiceError,
    ServiceTimeout,
    ServiceUnreachable,
)

__all__ = [
    "AsyncSegmentorClient",
    "FrameError",
    "Image",
    "Instance",
    "Product",
    "Products",
    "RetryPolicy",
    "Segmentation",
    "SegmentorClient",
    "ServiceError",
    "ServiceTimeout",
    "ServiceUnreachable",
]
