"""expertrain-gradnoise: annealed Gaussian gradient noise as an expertrain plugin (entry point ``gradnoise``)."""

from expertrain_gradnoise.plugin import GradNoiseConfig, add_gradient_noise, noise_seed, sigma

__all__ = ["GradNoiseConfig", "add_gradient_noise", "noise_seed", "sigma"]
