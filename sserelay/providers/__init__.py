"""What the providers' APIs say: payloads, usage, answers and error shapes (pure)."""
