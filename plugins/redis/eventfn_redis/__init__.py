"""eventfn-redis: the ``redis://`` broker of eventfn, on Redis Streams with consumer groups.

Installed, it registers itself for ``redis://`` and ``rediss://`` URLs through the
``eventfn.brokers`` entry-point group, so an app chooses it by URL alone::

    eventfn run shop:app --broker "redis://127.0.0.1:6379/0?namespace=shop"
"""

from eventfn_redis.broker import RedisBroker

__all__ = ["RedisBroker"]
