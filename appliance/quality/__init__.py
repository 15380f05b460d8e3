"""Judging models and data: the promotion gate, answer metrics, probe questions, and the data advisor."""
