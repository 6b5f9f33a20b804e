"""Fusing images with trained networks: arrays, folders, videos, and exported files."""
