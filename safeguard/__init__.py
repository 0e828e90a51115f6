"""safeguard: erase banned concepts from text-to-image models, prove it, record it, gate on it."""
import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("safeguard")
