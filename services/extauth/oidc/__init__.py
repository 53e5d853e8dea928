"""OpenID Connect: the login flow evaluator, its config, the provider client, redirect
checks and the session stores (sealed cookies, Redis)."""
