"""Inversion and editing: DDIM / iCD inversion, Prompt-to-Prompt, MasaCtrl, prompt swap."""
