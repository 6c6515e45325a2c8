"""Helpers shared by the command-line commands (the CLI itself, mmfs_fast.cli, imports them)."""
