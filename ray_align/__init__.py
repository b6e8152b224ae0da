"""ray_align."""
