"""The two model runtimes the stages call: transformers (loading offline, device choice) and llama.cpp (its tools, a crash-safe child worker, native llama-server processes)."""
