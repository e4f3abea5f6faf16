"""Loading base models, injecting adapters, and peft-format adapter files."""
