"""The three CMT modules (Θ compressor, ψ aggregator, π aligner) and the frozen LLM they feed."""
