"""Where text comes from: files, stdin and FIFOs, pacing, the upstream."""
