"""Ray Serve deployments wrapping the segmentation library; ``deployments.app:build_app``."""
