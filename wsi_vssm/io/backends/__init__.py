"""Slide backends, one per file. Each imports its native/optional library lazily, inside the class."""
