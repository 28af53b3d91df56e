"""The demo world: a synthetic text-to-image world whose concepts we control, for the demo and the benchmarks.

renderer (ground-truth images, the fixed linear 'VAE'), shapes (what the renderer draws, by object word),
vocabulary (a world's objects, synonyms, colours, captions, tokenizer), text_encoder (CONDITIONING), unet (comfy's
SD1.5 UNetModel, small), classifier (reads object and colour), world (loads world.safetensors and samples from it),
comfy_parts (its CLIP and VAE for ComfyUI's own nodes), reading (the classifier on images ComfyUI made), spec (the
shapes, words and text encoder of the demo world and of the benchmark's other worlds, benchmarks/worlds/).
benchmarks/train_demo_world.py trains them.
"""
