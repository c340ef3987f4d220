"""attnc.stdlib."""
