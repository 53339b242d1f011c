"""CTRL: add a new conditional control y to a pre-trained diffusion model with RL from offline labels."""

__version__ = "0.1.0"
