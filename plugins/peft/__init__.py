"""Parameter-efficient fine-tuning plugins and the low-rank adapter code they share."""
