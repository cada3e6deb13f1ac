"""The token service: the front door that hands browsers short-lived credentials."""
