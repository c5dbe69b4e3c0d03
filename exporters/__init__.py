"""pcpc.exporters: functional models (pure functions over a params dict) and their presets."""
