"""Model families: one module per model line (what differs: model types, LoRA targets, precision, the memory
estimate, the cache of a shared prefix); the stages ask the family of the checkpoint (registry.family_of)."""
