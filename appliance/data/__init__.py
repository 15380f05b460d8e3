"""Data stages: watch the inbox, ingest and validate files into the record store, cut snapshots, write corrections back. The general-conversations mix ships in general/."""
