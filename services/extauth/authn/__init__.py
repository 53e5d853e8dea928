"""Authentication methods (the core's identity evaluators): JWT with its JWKS key
sources, Basic auth over htpasswd, API keys, and credential extraction from requests."""
