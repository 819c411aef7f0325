"""Bundled YAML configs (read them with gmner_pipeline.config.bundled_config_path)."""
