"""CRIU image parsing: pure functions over file objects (pycriu's model)."""
