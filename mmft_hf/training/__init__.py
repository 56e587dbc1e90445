"""Stage 2 of MMFT: a captioned dataset -> a fine-tuned dual encoder (collator, loss, `MMFTTrainer`)."""
