"""The package's Hydra configs: a package, so that Hydra finds them by module name
(`hydra.initialize_config_module("framework.conf")`) wherever the package is installed."""
