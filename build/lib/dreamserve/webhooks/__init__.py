"""Webhooks: a job's end delivered to its replyUrl, signed, retried, recorded.

- `rules.py`: the retry schedule and Standard Webhooks signing (pure).
- `keys.py`: each user's signing secrets, sealed at rest, rotated with an overlap.
- `delivery.py`: the deliverer, a background task that claims due deliveries and sends them.
- `outbox.py`: what a client can do (the service façade's `webhooks` part).

The outbox rows themselves are written in the transaction that ends a job
(storage/webhook_queries.py); the address guard is netguard.py, applied to each connection
by outbound.py.
"""
