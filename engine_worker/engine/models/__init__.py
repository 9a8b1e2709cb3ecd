"""Model definitions the engine runs."""
