"""The OpenAI-compatible API service: HTTP in, Jobs to JetStream, Deltas back as SSE."""
