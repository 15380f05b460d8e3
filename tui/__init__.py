"""The Textual terminal app (issue 8). It will talk to the engine through appliance.api only."""
