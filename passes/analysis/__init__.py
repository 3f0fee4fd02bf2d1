"""Analyses passes use: channel dependency groups, the conv/linear nodes that carry weights."""
