"""The OpenAI-compatible endpoint: the guard, request validation and forwarding, the relay to llama-server backends, and the backend pool."""
