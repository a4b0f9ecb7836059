"""Fast or memory-saving compute, each with a plain reference implementation beside it."""
