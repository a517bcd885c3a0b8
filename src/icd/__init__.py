"""icd: invertible consistency distillation for fast text-guided image editing with latent diffusion models.

Entry points: `icd.pipeline.Pipeline` (invert, edit, generate), `icd.models.loading.load_model`, `icd.bench`,
`icd.world`. The layers are described in docs/architecture.md.
"""

__version__ = "0.1.0"
