"""icd: invertible consistency distillation for fast text-guided image editing with latent diffusion models.

Entry points: `icd.models.embedded.load_model`, `icd.sampling.generate`, `icd.editing.inversion`, `icd.world`.
"""

__version__ = "0.1.0"
