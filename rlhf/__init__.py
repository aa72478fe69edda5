"""Helpers shared by the three stage scripts and the tools in scripts/."""
