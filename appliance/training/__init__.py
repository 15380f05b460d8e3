"""Training stages: import the base model, render records with its chat template, choose the method, train the adapter, merge it."""
