"""eventfn's NATS JetStream broker: ``nats://host:4222?namespace=name``.

Installed, it registers the ``nats`` (and ``tls``) URL scheme with ``eventfn.brokers.from_url``::

    from eventfn.brokers import from_url

    broker = from_url("nats://127.0.0.1:4222?namespace=shop")
"""

from eventfn_nats._broker import NatsBroker

__all__ = ["NatsBroker"]
