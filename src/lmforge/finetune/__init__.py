"""Fine-tuning: task formats, packed loss-masked batches, LoRA, the `finetune` stage."""
