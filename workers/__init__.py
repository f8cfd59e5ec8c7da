"""The services of the LLM Auto Optimizer, one package each, on the shared worker runtime."""
