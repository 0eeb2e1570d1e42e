"""Starting things: a simulated federation, Flower's processes for a deployment, the consortium's certificates."""
