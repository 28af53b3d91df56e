"""ComfyUI Concept Erasure: remove concepts from Stable Diffusion models with learnable prompts.

ComfyUI imports this package from custom_nodes/ and reads the two mappings and the web folder below.
"""
# pytest, collecting a checkout whose folder name is not an identifier, imports this file as a lone module
# (no package, so no relative imports); tests/conftest.py imports the pack properly.
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    # The report's and the attack's summaries drawn on their nodes after a run (web/summaries.js).
    WEB_DIRECTORY = "./web"

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
