"""The sft stage: supervised fine-tuning on corrections and a demonstrations file."""
