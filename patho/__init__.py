"""patho-r1: train Qwen2.5-VL into a pathology reasoner (CPT -> CoT SFT -> GRPO/DAPO) and a retrieval embedder.

The root package holds the shared code (records and loaders, the config base, model loading, checkpoints, errors,
stain tools); the floors above it are `patho_r1.sft`, `patho_r1.rl`, `patho_r1.embed`, `patho_r1.eval` (phases) and
`patho_r1.launch` (orchestration and the CLI), beside `patho_r1.rewards` (below everything) and `patho_r1.fixtures`.
"""
