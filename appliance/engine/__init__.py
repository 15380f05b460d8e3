"""The engine: one job through the stages (pipeline), lineage and candidates, forget, human review, the daemon, and the in-process engine behind the contract."""
