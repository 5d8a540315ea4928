"""Offline batch jobs on Ray Data, built from the same segmentors as the service."""
