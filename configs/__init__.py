"""Profiles and experiment configs of deepsim, installed as the data package ``deepsim.configs``."""
