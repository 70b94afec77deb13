"""Sparse dictionaries of activations: SAEs, transcoders and their training, saving and loading."""
