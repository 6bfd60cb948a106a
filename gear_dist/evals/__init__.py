"""Quality measurements: KV fidelity, perplexity, agreement vs fp16, GSM8K, passkey."""
