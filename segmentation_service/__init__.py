"""The Ray Serve application: segmentors, router, admission (``app:build_app``)."""
