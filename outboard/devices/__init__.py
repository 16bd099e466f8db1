"""The devices outboard ships."""
