"""One class per model, each with ``predict(frames)`` on uint8 RGB arrays."""
