"""Built-in plugins, installed as ``safeguard.builtin``: erasers, probes, attacks and judges."""
