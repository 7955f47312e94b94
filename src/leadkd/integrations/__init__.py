"""Bridges from leadkd to other training libraries; each submodule imports its library only when imported itself."""
