"""ooc subsystem."""
