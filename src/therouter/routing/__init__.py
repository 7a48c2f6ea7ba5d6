"""Routing: which deployments may serve a request, in what order."""
