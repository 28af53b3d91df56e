"""Node registration: every node module contributes its classes here, once."""
from . import attack_node, demo_nodes, erase_node, erasure_nodes, lora_nodes, report_node, train_node

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (erasure_nodes, erase_node, train_node, report_node, lora_nodes, demo_nodes, attack_node):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
