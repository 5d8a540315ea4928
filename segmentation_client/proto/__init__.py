"""Generated gRPC stubs of ``segmentor.proto`` (``make protos``); imported only for grpc:// URLs."""
