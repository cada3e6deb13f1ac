"""The key-manager: the only holder of provider keys (encrypted at rest), leasing them sealed."""
