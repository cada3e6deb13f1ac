"""The proxy service: signed, fresh, rate-limited browser calls forwarded to the provider."""
