"""LLaVA captioners: LoRA finetuning (story / description adapters) and inference on one shared base."""
