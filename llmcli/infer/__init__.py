"""Inference: sampling and batched decoding, chat, continuous batching and the OpenAI HTTP server."""
