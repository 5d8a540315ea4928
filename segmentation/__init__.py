"""product-segmentor's segmentation library: plain PyTorch, no Ray.

``RMBG20Segmentor`` (background removal) and ``YoloSegmentor`` (instance segmentation) take
uint8 RGB frames and return one result per frame; the same classes serve Ray Serve replicas,
Ray Data jobs and scripts.
"""

from segmentation.config import Settings, load_settings, parse_bool

__all__ = ["Settings", "load_settings", "parse_bool"]
