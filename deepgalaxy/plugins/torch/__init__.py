"""The PyTorch framework plugin: backbones, decoder, head, VAE, training step and weights I/O in plain torch.

Importing this package does not import torch; :mod:`deepgalaxy.plugins.torch.plugin` only describes what it
provides, and the factories / framework are imported lazily when used.
"""
