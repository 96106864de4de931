"""What the command line runs: whole workflows built from the package's stages."""
