"""A synthetic text-to-image world whose concepts we control, for measuring concept erasure.

renderer (ground-truth images, the fixed linear 'VAE'), vocabulary (objects, synonyms, colours, captions),
text_encoder (CONDITIONING), unet (comfy's SD1.5 UNetModel, small), classifier (reads object and colour),
train (trains all three, seeded), world (loads the trained world and samples from it).
"""
