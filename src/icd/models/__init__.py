"""Model architectures and loading: the embedded tiny model, LoRA adapters, Stable Diffusion adapters."""
