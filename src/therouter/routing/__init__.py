"""Routing: which deployments may serve a request, in what order, and what to do when one fails.

options.py (knobs and defaults) · router.py (candidates: filters with reasons, order) · balance.py (weights,
in-flight, prefix affinity) · preferences.py (the request's `models` / `provider`) · attempts.py (retries, fallback,
budget, deadline) · breaker.py and budget.py (pure, clock-free policy) · state.py (per-deployment state) · shared.py
(drains and cooldowns through Redis) · health.py (active checks) · report.py (the admin view).
"""
