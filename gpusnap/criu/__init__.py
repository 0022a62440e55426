"""Everything about CRIU: finding it, building its command lines, running it, reading its logs."""
