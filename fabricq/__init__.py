"""fabricq: fast GPTQ compression of large language models with Lightning Fabric and Hydra."""

__version__ = "0.1.0"
