"""HOMIE-style omni-modal embeddings on the shared Qwen2.5-VL backbone (a LoRA adapter beside the reasoner)."""
