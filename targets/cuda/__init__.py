"""CUDA builds: what the device code of a build is and how it is checked."""
