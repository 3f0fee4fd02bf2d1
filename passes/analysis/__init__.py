"""Analyses passes use: channel dependency groups."""
