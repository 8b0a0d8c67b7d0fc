"""Tools for testing with eventfn: the broker conformance kit.

``check_broker`` runs every contract of ``DESIGN.md`` section 7 against a broker, so that a third
party's adapter is held to the same rules as eventfn's own (the project's broker suite uses it)::

    from eventfn.testing import check_broker

    async def test_my_broker() -> None:
        await check_broker(lambda: MyBroker("my://127.0.0.1/test"))
"""

from eventfn._conformance import CHECKS, check_broker

__all__ = ["CHECKS", "check_broker"]
