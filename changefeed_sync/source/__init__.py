"""Source side: capture -> outbox -> feed / snapshot -> views; push and delivery backends."""
