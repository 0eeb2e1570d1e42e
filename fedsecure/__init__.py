"""fedsecure: federated, differentially private LoRA fine-tuning of DeepSeek models across hospitals."""

