"""Training: plain functions and scripts over them (data, losses such as the chunked cross-entropy
over the 262k vocabulary, and the trainer loop and post-training recipes built on those)."""
