"""``amqp://``: the RabbitMQ broker for eventfn (see this distribution's README for the mapping).

>>> broker = AmqpBroker("amqp://guest:guest@127.0.0.1:5672/?namespace=shop")
"""

from __future__ import annotations

from eventfn_amqp.broker import AmqpBroker

__all__ = ["AmqpBroker"]
