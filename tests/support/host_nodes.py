"""ComfyUI's own node classes: comfy.nodes.base_nodes in the PyPI fork, the top-level `nodes` module upstream
(which needs PyAV, as upstream's requirements install it)."""


def host_nodes():
    try:
        from comfy.nodes import base_nodes as nodes  # the PyPI fork
    except ImportError:
        import nodes  # upstream ComfyUI
    return nodes
