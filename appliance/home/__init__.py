"""The home's state: where every file lives (paths), settings, the model registry, the job journal, the audit chain, API keys and the catalog of collections."""
