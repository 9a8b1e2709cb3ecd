"""Speculative decoding: propose a few tokens cheaply, let the model verify them in one step."""
